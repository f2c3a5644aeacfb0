"""The export of a model that goes on training: what to copy now, what to write later.

:func:`snapshot_export` gives trainer/online/publish.py a writer that its
forked child runs; what the training thread does before the fork is the
publish's blocked time.

* **One process**: the fork is the snapshot (the child sees the model as it
  was, copy-on-write), so nothing is copied, and the writer runs
  trainer/export/step.py's ``export_step`` whole (no collective with one rank),
  for every model it exports.
* **More ranks**: ``export_step`` cut in two. On every rank, before the fork:
  its collective half -- the converters' state synced, every table packed
  where its rows are and gathered on rank 0 (``sharded_tables``: new tensors),
  rank 0's dense layers copied. Rank 0's writer does the rest from those:
  build the served program, ``torch.export`` it, write the bundle, score the
  eval set (``export_streamed``); the other ranks get None. Models that are not
  streamed (row pruning, distillation) are exported whole before the fork
  into a staging directory, and the writer only moves the bundle into place:
  correct, but blocked for the whole export. (Not yet run by a test.)

Example::

    write = snapshot_export(built.model, model_config=cfg.model, converters=built.converters,
                            tables=built.tables, source=stream.source, eval_batch_size=512,
                            staging=run_dir / "exports" / ".tmp-stage")
    if write is not None:               # rank 0
        result = write(Path("exports/.tmp-v3"))   # in the forked child
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from compression.converter import Converters
from trainer.config.schema import ModelConfig
from trainer.config.tables import RunTables
from trainer.data.source import DataSource
from trainer.export.bundle import BUNDLE_DIR
from trainer.export.step import export_step, export_streamed, meta_trained
from trainer.export.stream import dense_state, sharded_tables, streamable, table_specs
from trainer.online.publish import STAGE_SUFFIX, Writer


def snapshot_export(
    model: nn.Module,
    *,
    model_config: ModelConfig,
    converters: Converters,
    tables: RunTables,
    source: DataSource,
    eval_batch_size: int,
    staging: Path,
    data_config: Any = None,
) -> Writer | None:
    """Collective: copies what the export needs; returns rank 0 the writer (see above)."""
    export: dict[str, Any] = {
        "model_config": model_config,
        "converters": converters,
        "tables": tables,
        "source": source,
        "eval_batch_size": eval_batch_size,
        "data_config": data_config,
    }
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _whole_in_child(model, **export)
    rank = dist.get_rank()
    meta = meta_trained(
        model_config, tables=tables, num_dense=source.num_dense, converters=converters
    )
    if streamable(converters, meta) is not None:
        return _exported_now(model, staging=staging, **export)
    converters.state_dict()  # collective, as export_step does
    specs = table_specs(meta, converters)
    packed = list(sharded_tables(model, specs))  # collective; packs are new tensors
    if rank != 0:
        return None
    skip = {t.key for t in specs}
    dense = {k: v.clone() for k, v in dense_state(model, skip=skip).items()}

    def write(directory: Path) -> dict[str, Any]:
        result = export_streamed(
            meta,
            specs,
            iter(packed),
            dense,
            converters=converters,
            source=source,
            batch_size=eval_batch_size,
            bundle=directory,
            data_config=data_config,
        )
        return result

    return write


def _whole_in_child(model: nn.Module, **export: Any) -> Writer:
    """One process: nothing to copy, the fork is the snapshot; the writer runs
    ``export_step`` (no collective with one rank) on the child's view of ``model``."""

    def write(directory: Path) -> dict[str, Any]:
        staging = directory.with_name(directory.name + STAGE_SUFFIX)
        result = export_step(model, run_dir=staging, **export)
        if result.get("path") is None:
            raise RuntimeError(f"no serving bundle: {result.get('bundle_error')}")
        os.replace(staging / BUNDLE_DIR, directory)
        shutil.rmtree(staging, ignore_errors=True)
        return result

    return write


def _exported_now(model: nn.Module, *, staging: Path, **export: Any) -> Writer | None:
    """The whole export on this thread (collective), into ``staging``; the writer moves it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    result = export_step(model, run_dir=staging, **export)
    if rank != 0:
        return None

    def write(directory: Path) -> dict[str, Any]:
        if result.get("path") is None:
            raise RuntimeError(f"no serving bundle: {result.get('bundle_error')}")
        os.replace(staging / BUNDLE_DIR, directory)
        shutil.rmtree(staging, ignore_errors=True)
        return result

    return write
