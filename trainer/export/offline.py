"""``python -m trainer.export <checkpoint_dir> [--bits 8|4|2] [--range R] [--out DIR]``.

Serves a checkpoint.

One process, no process group: rebuilds the model from the checkpoint's
``config.yaml`` with the converters' saved state (e.g. row pruning's access
counts) and exports it as the end of that run would have (the same
converters: the run's QAT bits, or ``--bits`` for every table; the run's
``qat.range``, or ``--range minmax|mse``). Streamed (trainer/export/stream.py):
the dense layers are read, then one table at a time (every rank's shards of
it, through ``SafeReader``), packed and dropped, so the fp32 model is never in
memory; models the stream does not cover are read whole. Writes the serving
bundle ``--out`` (default ``<checkpoint>/bundle/``) and the result beside it as
``<out>.json``; prints the result. A missing or incomplete checkpoint is one
line, exit 2.

Example::

    python -m trainer.export outputs/run/checkpoints/step_2000 --bits 4 --out served
    python -m trainer.export outputs/run/checkpoints/step_2000 --bits 2 --range mse
    result = export_checkpoint(Path("outputs/run/checkpoints/step_2000"), bits=4)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from compression.row_range import RANGES
from trainer.builder.compression import build_converters
from trainer.checkpoint.load import (
    check_checkpoint,
    is_complete,
    load_unsharded_model,
    missing_message,
)
from trainer.checkpoint.safe_reader import SafeReader, read_checkpoint_metadata
from trainer.config.saved import read_config
from trainer.config.schema import ConfigError
from trainer.config.tables import run_tables
from trainer.config.validate import open_source
from trainer.export.bundle import BUNDLE_DIR
from trainer.export.step import build_trained, export_model, export_streamed, meta_trained
from trainer.export.stream import checkpoint_dense, checkpoint_tables, streamable, table_specs


def export_checkpoint(
    checkpoint: Path,
    *,
    bits: int | None = None,
    row_range: str | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """The serving model of a saved checkpoint; raises FileNotFoundError when it is not one,
    ConfigError when it would not load safely (trainer/checkpoint/safe_reader.py)."""
    if not is_complete(checkpoint):
        raise FileNotFoundError(missing_message(checkpoint, key="checkpoint_dir"))
    check_checkpoint(checkpoint, key="checkpoint_dir")  # before any data or model is built
    cfg = read_config(checkpoint)
    source = open_source(cfg.data)
    tables = run_tables(cfg, features=source.features, export_bits_override=bits)
    converters = build_converters(
        cfg, tables=tables, device_type="cpu", export_range_override=row_range
    )
    converters.load_state_dict(_saved_converter_state(checkpoint))  # e.g. access counts
    out = out or checkpoint / BUNDLE_DIR
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "converters": converters,
        "source": source,
        "batch_size": cfg.trainer.eval_batch_size,
        "bundle": out,
        "data_config": cfg.data,
    }
    meta = meta_trained(cfg.model, tables=tables, num_dense=source.num_dense, converters=converters)
    if streamable(converters, meta) is None:
        specs = table_specs(meta, converters)
        dense, step = checkpoint_dense(checkpoint, skip={t.key for t in specs})
        stream = checkpoint_tables(checkpoint, specs)
        result = export_streamed(meta, specs, stream, dense, **common)
    else:
        trained = build_trained(
            cfg.model, tables=tables, num_dense=source.num_dense, converters=converters
        )
        step = load_unsharded_model(checkpoint, trained)
        result = export_model(trained, **common)
    result["step"] = step
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


def _saved_converter_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's ``compression`` entry (one process), shaped from its metadata."""
    metadata = read_checkpoint_metadata(checkpoint).state_dict_metadata
    template: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in metadata.items():
        parts = key.split(".")
        if parts[0] != "compression" or len(parts) != 3 or not hasattr(meta, "size"):
            continue
        template.setdefault(parts[1], {})[parts[2]] = torch.empty(
            meta.size, dtype=meta.properties.dtype
        )
    if template:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load({"compression": template}, storage_reader=SafeReader(checkpoint), no_dist=True)
    return template


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Quantize a saved checkpoint for serving, save it and score it on the "
        "eval set (one process; the checkpoint's config.yaml says how to rebuild it).",
    )
    parser.add_argument("checkpoint_dir", type=Path, help="a <run_dir>/checkpoints/step_N dir")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(8, 4, 2),
        help="bits for every table but those under qat.small_table_rows (default: the run's "
        "QAT bits, else trainer.export_bits)",
    )
    parser.add_argument(
        "--range",
        choices=RANGES,
        help="each row's quantization range (default: the run's qat.range); mse fits it to "
        "the row's rounding error, which helps int2 post-training export",
    )
    parser.add_argument(
        "--out", type=Path, help="the bundle directory (default: <checkpoint_dir>/bundle)"
    )
    args = parser.parse_args(argv)
    from sharding.quiet import quiet_libraries

    quiet_libraries()
    try:
        result = export_checkpoint(
            args.checkpoint_dir, bits=args.bits, row_range=args.range, out=args.out
        )
    except (FileNotFoundError, ConfigError) as err:
        print(f"shardrec: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
