"""``python -m trainer.prepare data=criteo|table ...``: raw data into binary shards, once.

:func:`prepare` is the whole job (the CLI in ``__main__`` only composes the
config): check the settings and inputs, skip if ``data.dir`` already holds
shards from the same settings and unchanged inputs (the fingerprint), run the
source's pipeline (:mod:`trainer.prepare.criteo`, :mod:`trainer.prepare.table`)
into a temporary sibling directory, number the parts, write ``metadata.json``
last and rename the directory into place. A killed prepare leaves only a
``.<dir>.tmp-<pid>`` directory, never one that looks complete.

Example::

    from trainer.data.data_configs import CriteoDataConfig
    result = prepare(CriteoDataConfig(raw=["day_0"], dir="data/criteo"))
    result.metadata.splits["train"].num_rows, result.up_to_date
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.data.data_configs import (
    CriteoDataConfig,
    JoinConfig,
    PreparedDataConfig,
    TableDataConfig,
    TableFormat,
)
from trainer.data.shard_format import METADATA_FILE, PartInfo, ShardMetadata, SplitInfo
from trainer.prepare.common import PrepareError, check_inputs
from trainer.prepare.output import VOCAB_DIR, PipelineOutput

__all__ = [
    "PrepareError",
    "PrepareResult",
    "inputs_fingerprint",
    "prepare",
    "prepared_config",
    "recorded_settings",
    "settings_fingerprint",
]

# Bump when the same settings and inputs would give different arrays or metadata
# (2: metadata.json has the train split's dense_stats).
PREPARE_VERSION = 2
# Settings that do not change the arrays (how fast, where, and the reader's own).
_NOT_IN_FINGERPRINT = {
    "dir",
    "num_workers",
    "chunk_bytes",
    "batch_rows",
    "seed",
    "shuffle",
    "check_ids",
    "dense_norm",
}
# data.partition_by's keys: in the fingerprint only when set (older fingerprints stay valid).
_TIME_KEYS = ("partition_by", "timestamp_column", "timestamp_unit", "timestamp_format")


@dataclass
class PrepareResult:
    directory: Path
    metadata: ShardMetadata
    # True: data.dir already held these shards; nothing was written.
    up_to_date: bool
    # data.partition_by: the partitions this call appended, in order.
    appended: list[str] = field(default_factory=list)
    # data.partition_by: the rows skipped (data.on_bad_row=skip), as metadata's bad_rows.
    skipped: dict = field(default_factory=dict)


def prepare(cfg: PreparedDataConfig, *, progress: bool = True) -> PrepareResult:
    """Prepares ``cfg.raw`` (and ``cfg.eval_raw``) into ``cfg.dir``; see the module docstring."""
    _check_settings(cfg)
    if isinstance(cfg, TableDataConfig) and str(cfg.partition_by) != "none":
        from trainer.prepare.partition_by_time import prepare_by_time

        return prepare_by_time(cfg, progress=progress)
    if cfg.partition:  # one partition of a partitioned dataset, appended
        from trainer.prepare.partitions import prepare_partition

        return prepare_partition(cfg, progress=progress)
    directory = Path(cfg.dir).expanduser()
    inputs = _inputs(cfg)
    fingerprint = settings_fingerprint(cfg, inputs)
    if (directory / METADATA_FILE).is_file():
        try:
            existing = ShardMetadata.read(directory)
        except (ValueError, TypeError, KeyError):
            existing = None
        if existing is not None and existing.fingerprint == fingerprint:
            record_settings(directory, existing, cfg)
            return PrepareResult(directory, existing, up_to_date=True)
    if directory.exists() and not _replaceable(directory):
        raise PrepareError(
            f"data.dir={directory} exists and is not a prepared data directory (no "
            f"{METADATA_FILE}); prepare replaces only its own output: pick a new or empty directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory)
    work = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        output = _run_pipeline(cfg, work, progress=progress)
        meta = _finish(cfg, work, output, fingerprint=fingerprint, inputs=inputs)
        _swap_into_place(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return PrepareResult(directory, meta, up_to_date=False)


def settings_fingerprint(cfg: PreparedDataConfig, inputs: list[dict]) -> str:
    """sha256 of the settings that shape the arrays and of the inputs (path, size, mtime)."""
    settings = fingerprint_settings(cfg)
    blob = json.dumps(
        {"version": PREPARE_VERSION, "settings": settings, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def inputs_fingerprint(cfg: PreparedDataConfig, inputs: list[dict]) -> str:
    """The fingerprint prepare gives ``cfg`` over metadata.json's ``inputs``: a period of
    ``data.partition_by`` has its own (the dataset's settings, its name and rows)."""
    if inputs and "period" in inputs[0]:
        from trainer.prepare.partition_by_time import period_fingerprint
        from trainer.prepare.partitions import shared_settings

        period = inputs[0]
        return period_fingerprint(shared_settings(cfg), period["period"], period["content"])
    return settings_fingerprint(cfg, inputs)


def fingerprint_settings(cfg: PreparedDataConfig) -> dict:
    """The settings that shape the arrays (the fingerprint's), as in ``asdict(cfg)``."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    if str(settings.get("partition_by", "none")) == "none":
        for key in _TIME_KEYS:
            settings.pop(key, None)
    if not settings.get("timestamp_format"):  # unset: the fingerprints from before it
        settings.pop("timestamp_format", None)
    return settings


def recorded_settings(cfg: PreparedDataConfig) -> dict[str, Any]:
    """metadata.json's ``settings``: the data.* settings prepare ran with (the fingerprint's,
    as JSON values), so that an export can describe the raw rows without the run repeating
    them (:func:`prepared_config`)."""
    return json.loads(json.dumps(fingerprint_settings(cfg), default=str))


def prepared_config(
    settings: dict[str, Any], *, reader: PreparedDataConfig | None = None
) -> PreparedDataConfig | None:
    """The data config prepare ran with, from metadata.json's ``settings`` (None when the
    metadata predates them, or names no known source); the reader's own settings (dir,
    batch_rows, seed, ...: not in the fingerprint) are ``reader``'s, else the defaults."""
    schema = {"criteo": CriteoDataConfig, "table": TableDataConfig}.get(settings.get("name", ""))
    if schema is None:
        return None
    known = {f.name for f in fields(schema)}
    values = {k: v for k, v in settings.items() if k in known}  # as recorded: the same JSON
    if reader is not None:
        values.update({k: getattr(reader, k) for k in _NOT_IN_FINGERPRINT & known})
    for key, hint in typing.get_type_hints(schema).items():
        if key in values and isinstance(hint, type) and issubclass(hint, enum.Enum):
            values[key] = hint(values[key])
    if "joins" in values:
        values["joins"] = [
            JoinConfig(raw=j["raw"], on=j["on"], format=TableFormat(j["format"]))
            for j in values["joins"]
        ]
    return schema(**values)


def record_settings(directory: Path, meta: ShardMetadata, cfg: PreparedDataConfig) -> None:
    """An up-to-date metadata.json written before prepare recorded its settings gets them
    (replaced atomically; the arrays and the fingerprint stay)."""
    if not meta.settings:
        meta.settings = recorded_settings(cfg)
        meta.write(directory)


def _check_settings(cfg: PreparedDataConfig) -> None:
    if not cfg.dir:
        raise PrepareError("data.dir is not set: pass data.dir=DIR (where the shards go)")
    if not cfg.raw:
        raise PrepareError(f"data.raw is empty: pass 'data.raw=[FILE,...]' (data={cfg.name})")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise PrepareError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if cfg.min_count < 1:
        raise PrepareError(f"data.min_count={cfg.min_count} must be at least 1")
    if cfg.chunk_bytes < 1024:
        raise PrepareError(f"data.chunk_bytes={cfg.chunk_bytes} must be at least 1024")


def _inputs(cfg: PreparedDataConfig) -> list[dict]:
    files = [("train", p) for p in check_inputs(cfg.raw, "data.raw")]
    files += [("eval", p) for p in check_inputs(cfg.eval_raw, "data.eval_raw")]
    if isinstance(cfg, TableDataConfig):
        files += [("join", p) for p in check_inputs([j.raw for j in cfg.joins], "data.joins")]
    out = []
    for split, path in files:
        stat = path.stat()
        out.append(
            {"path": str(path), "split": split, "size": stat.st_size, "mtime": stat.st_mtime_ns}
        )
    return out


def _run_pipeline(
    cfg: PreparedDataConfig, work: Path, *, progress: bool, base_vocab: Path | None = None
) -> PipelineOutput:
    if isinstance(cfg, CriteoDataConfig):
        from trainer.prepare.criteo import prepare_criteo

        return prepare_criteo(cfg, work=work, progress=progress, base_vocab=base_vocab)
    if isinstance(cfg, TableDataConfig):
        from trainer.prepare.table import prepare_table

        return prepare_table(cfg, work=work, progress=progress, base_vocab=base_vocab)
    raise PrepareError(f"data={cfg.name} is not prepared data; use data=criteo or data=table")


def _finish(
    cfg: PreparedDataConfig,
    work: Path,
    output: PipelineOutput,
    *,
    fingerprint: str,
    inputs: list[dict],
    settings: dict[str, Any] | None = None,
) -> ShardMetadata:
    """Numbers the parts, drops the scratch, writes metadata.json (last); ``settings``:
    those it records (default: ``cfg``'s, :func:`recorded_settings`)."""
    if not output.parts.get("train"):
        raise PrepareError(
            f"data.raw {list(cfg.raw)}: no train rows left "
            f"({output.bad_rows.get('skipped', 0)} bad rows skipped)"
        )
    splits, file_digests = {}, []
    for split in ("train", "eval"):
        infos = []
        for i, part in enumerate(output.parts.get(split, [])):
            rel = f"{split}/part-{i:05d}"
            (work / split).mkdir(exist_ok=True)
            part.path.rename(work / rel)
            infos.append(PartInfo(path=rel, num_rows=part.num_rows))
            file_digests += [f"{rel}/{name} {d}" for name, d in sorted(part.digests.items())]
        if infos:
            splits[split] = SplitInfo(num_rows=sum(p.num_rows for p in infos), parts=infos)
    shutil.rmtree(work / "ranges", ignore_errors=True)
    mapping = {"kind": str(cfg.mapping), "missing_row": 0}
    if str(cfg.mapping) == "vocab":
        mapping.update(min_count=cfg.min_count, oov_row=1, vocab_dir=VOCAB_DIR)
    meta = ShardMetadata(
        source=cfg.name,
        num_dense=output.num_dense,
        features=output.features,
        splits=splits,
        mapping=mapping,
        fingerprint=fingerprint,
        checksum=hashlib.sha256("\n".join(file_digests).encode()).hexdigest(),
        inputs=inputs,
        bad_rows=output.bad_rows,
        dense_names=output.dense_names,
        dense_stats=output.dense_stats,
        settings=recorded_settings(cfg) if settings is None else settings,
    )
    meta.write(work)
    return meta


def _replaceable(directory: Path) -> bool:
    """An earlier prepare's output, or an empty directory: never anything else of the user's."""
    if not directory.is_dir():
        return False
    return (directory / METADATA_FILE).is_file() or not any(directory.iterdir())


def _swap_into_place(work: Path, directory: Path) -> None:
    """Renames ``work`` to ``directory``; an older ``directory`` is removed after."""
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        directory.rename(old)
    work.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(directory: Path) -> None:
    """Scratch directories of prepares that were killed (their process is gone)."""
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
