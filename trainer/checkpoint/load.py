"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and resuming from them.

A checkpoint is one DCP directory holding a dict of DCP ``Stateful`` objects,
with no special cases: ``model`` (table shards as ``ShardedTensor``;
data-parallel tables and dense layers as plain tensors), ``optimizer``
(FBGEMM's fused row-wise Adagrad momentum, sharded like its table, and the
dense Adam state), ``trainer`` (the step), ``data`` (the source's state: its
fingerprint, so other data is refused) and ``compression`` (the converters'
state, e.g. the fp16 loss scale). Every entry is tensors only. Loading never
unpickles: DCP's ``.metadata`` (a pickle) is read by
trainer/checkpoint/safe_reader.py's unpickler, which admits only DCP's metadata
classes and refuses anything else in one line naming the file; the tensors are
read with ``torch.load(weights_only=True)``; and a checkpoint whose metadata
lists a non-tensor (bytes) entry, which DCP would
``torch.load`` with weights_only off, is refused. Every DCP read goes through
:class:`SafeReader` (``dcp.load(..., storage_reader=SafeReader(path))``), and
:func:`check_checkpoint` runs all these checks when the config is validated,
before any process group exists. Rank 0 adds
the resolved config as ``config.yaml``, so a checkpoint can be rebuilt without
the run that wrote it. Each rank writes only its own shards, and DCP reshards
on load, so a checkpoint loads into another plan or world size (a hashed or
managed-collision model only into its own rank blocks of ids:
trainer/checkpoint/id_layout.py), or into one process with plain tensors
(:func:`load_unsharded_model`, used by ``python -m trainer.export``). Sources
address samples by step, so the step restores the data position; a source
with more state keeps it in its own entry. Saving (atomic, async, failure
policy) is trainer/checkpoint/save.py.

Layout, written atomically (DCP writes into ``.tmp-step_N``; rank 0 renames it
once every rank has finished and the config is in), so a job killed mid-save
leaves only a temp dir, which resume ignores and the next save removes::

    <run_dir>/checkpoints/step_500/   .metadata  __0_0.distcp  __1_0.distcp  config.yaml
    <run_dir>/checkpoints/step_1000/
    <run_dir>/checkpoints/.tmp-step_1500/     (a save that did not finish)

Example::

    states = {"model": ModelState(dmp), "optimizer": OptimizerState(opt), "trainer": trainer,
              "data": source, "compression": converters}
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, every_steps=500, keep=2,
                        config_yaml=config_to_yaml(cfg))
    ckpt.save(step=500, states=states)       # trainer/checkpoint/save.py
    path = resolve_resume("auto", run_dir=run_dir)          # newest complete one, or None
    load_checkpoint(path, states=states)                    # each entry's load_state_dict
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from trainer.checkpoint.id_layout import check_id_layout
from trainer.checkpoint.safe_reader import (
    METADATA_FILE,
    BadCheckpointError,
    SafeReader,
    check_data_files,
    read_checkpoint_metadata,
)
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
# Entries a checkpoint may lack (written before they existed, or by a run
# without that converter): they start fresh, with a note in the log.
_OPTIONAL = ("data", "compression")
_METADATA_FILE = METADATA_FILE  # DCP writes it last, once every rank's files are written
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")
# Resuming into a different model or data would fail deep inside DCP (or, worse,
# load): these groups must match the checkpoint's.


def is_complete(path: Path) -> bool:
    """A finished checkpoint: DCP's metadata and the config are both there."""
    return (path / _METADATA_FILE).is_file() and (path / CONFIG_FILE).is_file()


def check_checkpoint(path: Path, *, key: str) -> None:
    """Raises ConfigError (one line) unless ``path`` is a complete checkpoint that loads safely.

    Its metadata unpickles with only DCP's classes (never running code), lists
    tensors only, and every data file it lists is there, whole. ``key``: the
    setting that named it (``trainer.resume``), for the message.
    """
    if not is_complete(path):
        raise ConfigError(missing_message(path, key=key))
    try:
        metadata = read_checkpoint_metadata(path)
        _refuse_pickles(path, metadata.state_dict_metadata)
        check_data_files(path, metadata)
    except ConfigError as err:
        raise BadCheckpointError(f"{key}: {err}") from None


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete ``step_N`` checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class ModelState:
    """The model as a DCP ``Stateful`` (its state dict holds ShardedTensors)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


class OptimizerState:
    """The combined (fused table + dense) optimizer as a DCP ``Stateful``."""

    def __init__(self, optimizer: KeyedOptimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def _init_optimizer_state(optimizer: KeyedOptimizer) -> None:
    """Creates lazily built state (torch's Adam) so the checkpoint can load into it.

    torchrec's ``init_state`` takes one step with zero gradients; it can move the
    weights (weight decay), which is harmless: the checkpoint overwrites them.
    The fused table optimizer's state exists from the start.
    """
    optimizers = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else []
    for _, opt in optimizers or [("", optimizer)]:
        if len(opt.state) < len(opt.params):
            opt.init_state()
            opt.zero_grad(set_to_none=True)


def load_checkpoint(path: Path, *, states: dict[str, Stateful]) -> None:
    """Collective: loads ``path`` into every entry of ``states`` (DCP reshards to this plan).

    Each rank reads just its own shards. An entry in ``_OPTIONAL`` that the
    checkpoint lacks, or a part of one (a converter a run without fp16 did not
    save), keeps its fresh state.
    """
    full_metadata = read_checkpoint_metadata(path)  # never unpickles (safe_reader.py)
    check_data_files(path, full_metadata)  # trainer.resume=auto was not validated
    metadata = full_metadata.state_dict_metadata
    _refuse_pickles(path, metadata)
    # "a" and "a.b" for every saved key "a.b.c...".
    saved_prefixes = {".".join(key.split(".")[:n]) for key in metadata for n in (1, 2)}
    wanted = {key: value for key, value in states.items() if key in saved_prefixes}
    missing = sorted(set(states) - set(wanted))
    required = [key for key in missing if key not in _OPTIONAL]
    if required:
        raise ConfigError(
            f"trainer.resume={path} has no {required} entry (it was written by an older "
            f"shardrec or is not a trainer checkpoint); start fresh with trainer.resume=null"
        )
    # An entry with nothing to hold (no stateful converter this run) is not news.
    missing = [key for key in missing if states[key].state_dict()]
    if missing:
        log.info("checkpoint %s has no %s state; starting it fresh", path, missing)
    for value in wanted.values():
        if isinstance(value, OptimizerState):  # lazily built state must exist to load into
            _init_optimizer_state(value.optimizer)
    template = {key: value.state_dict() for key, value in wanted.items()}
    for key in _OPTIONAL:
        if key in template:
            template[key] = {
                name: entry
                for name, entry in template[key].items()
                if f"{key}.{name}" in saved_prefixes
            }
    _check_same_layout(path, template, saved=set(metadata))
    check_id_layout(path, template, metadata)  # a hashed / MC model's rank blocks of ids
    dcp.load(template, storage_reader=SafeReader(path))
    for key, value in wanted.items():
        value.load_state_dict(template[key])


def _refuse_pickles(path: Path, metadata: dict[str, Any] | None = None) -> None:
    """A bytes entry would be unpickled by DCP's default planner: never load one."""
    if metadata is None:
        metadata = read_checkpoint_metadata(path).state_dict_metadata
    pickled = [k for k, v in metadata.items() if isinstance(v, BytesStorageMetadata)]
    if pickled:
        raise ConfigError(
            f"{path} holds non-tensor entries {pickled[:5]} that loading would unpickle "
            f"(arbitrary code); shardrec checkpoints hold tensors only. Load only checkpoints "
            f"you wrote, or start fresh with trainer.resume=null"
        )


def _check_same_layout(path: Path, template: dict[str, Any], *, saved: set[str]) -> None:
    """Every tensor this run needs is in the checkpoint, or a ConfigError says what moved.

    DCP reshards a table between any plans of the same kernel family; a table that
    moves between the fused kernels (row-wise Adagrad ``momentum1``, sharded) and
    ``data_parallel`` (a plain tensor with the dense optimizer's state) changes its
    optimizer state's keys, which DCP would report as a bare missing key.
    """
    flat, _ = flatten_state_dict(template)
    missing = sorted(k for k in flat if k not in saved)
    if not missing:
        return
    tables = sorted({m for k in missing for m in re.findall(r"embedding_bags\.(\w+)\.", k)})
    hint = (
        f"tables {tables[:8]} changed between a fused kernel and data_parallel (their "
        f"optimizer state differs); give them the checkpoint's kind again (see plan.json "
        f"beside it, e.g. sharding.strategy or a per-table plan)"
        if tables
        else "the model or optimizer differ from the checkpoint's (see its config.yaml)"
    )
    raise ConfigError(
        f"trainer.resume={path} lacks {len(missing)} state entries this run needs "
        f"(e.g. {missing[:3]}): {hint}, or start fresh with trainer.resume=null"
    )


def load_unsharded_model(path: Path, model: nn.Module) -> int:
    """One process, no process group: loads the checkpoint's weights into a plain model.

    The table shards of every rank are read into the full tensors of ``model``
    (e.g. ``build_trained(read_config(path).model, ...)``); the optimizer
    state is left on disk. Returns the step.
    """
    _refuse_pickles(path)
    state = {"model": model.state_dict(), "trainer": {"step": torch.tensor(0)}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, storage_reader=SafeReader(path), no_dist=True)
    model.load_state_dict(state["model"])
    return int(state["trainer"]["step"])


def resolve_resume(resume: str | None, *, run_dir: Path) -> Path | None:
    """Collective: the checkpoint to resume from, the same on every rank (rank 0 decides).

    ``None``: start fresh; ``auto``: the newest complete checkpoint under
    ``run_dir/checkpoints`` (fresh if there is none); else a checkpoint path.
    """
    if resume is None:
        return None
    answer: list[Any] = [None]
    if _is_main():
        if resume == "auto":
            found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
            answer[0] = str(found[-1]) if found else None
        elif is_complete(Path(resume)):
            answer[0] = str(Path(resume).resolve())
        else:
            answer[0] = ConfigError(missing_message(Path(resume), key="trainer.resume"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ConfigError):
        raise answer[0]
    return Path(answer[0]) if answer[0] else None


def missing_message(path: Path, *, key: str) -> str:
    what = "does not exist" if not path.exists() else "is not a complete checkpoint"
    return (
        f"{key}: {path} {what} (a complete one holds DCP's {_METADATA_FILE} and "
        f"{CONFIG_FILE}; a save that did not finish stays in {_TMP_PREFIX}step_N); pass "
        f"a <run_dir>/{CHECKPOINT_DIR}/step_N directory"
    )


def restore_records(metrics_path: Path, *, step: int) -> list[dict[str, Any]]:
    """Rank 0 on resume: keeps the records up to ``step`` and drops later ones from the file.

    A job that died after its last checkpoint logged steps it will train again;
    without this they would appear twice.
    """
    if not metrics_path.is_file():
        return []
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    kept = [r for r in records if r.get("step", 0) <= step]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept
