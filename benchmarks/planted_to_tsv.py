"""Write the synthetic source's planted clicks as Criteo TSV, with their oracle AUC.

The end-to-end check of the real-data path: ``prepare`` + ``train`` on these
files must reach AUC within 0.01 of ``oracle_auc`` (the planted model's own AUC
on the eval rows), so nothing is lost between a Criteo file and the model.

What a sample becomes (one line: label, 13 integers, 26 hex ids, tab-separated):

- dense ``x`` (standard normal) -> the integer ``v = round(exp(x + 5) - 1)``:
  prepare's ``log(1 + max(v, 0))`` gives back ``x + 5`` up to the rounding, at
  most ``0.5 * exp(-(x + 5))`` (under 0.07 for ``x > -3``); monotone in ``x``
  (only ``x < -4.6``, about 2 in a million, reads as 0 like a blank);
- id ``i`` of a table of ``c`` rows -> ``i`` as 8 hex digits; with
  ``data.table_rows`` at least ``c + 1`` (``planted.json`` lists them), the hash
  mapping ``1 + id % (rows - 1)`` keeps every id on its own row;
- each field but the label is blanked with probability ``--blank-fraction``
  (prepare maps a blank to dense 0 and to the missing-value row 0), so the file
  has the holes real logs have; the default 1% costs the model little.

``OUT/train.tsv`` holds the synthetic train split's first ``--num-train``
samples, ``OUT/eval.tsv`` the eval split (``--num-eval`` samples, those the
oracle AUC is computed on), ``OUT/planted.json`` the oracle AUC, the table rows
and the commands to prepare and train.

Example::

    python -m benchmarks.planted_to_tsv outputs/planted --num-train 2048000
    python -m trainer.prepare data=criteo 'data.raw=[outputs/planted/train.tsv]' \\
        'data.eval_raw=[outputs/planted/eval.tsv]' 'data.table_rows=[1461,...]' \\
        data.dir=outputs/planted/shards           # the exact line is in planted.json
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import SyntheticCriteo, SyntheticDataConfig

DENSE_SHIFT = 5.0
HEX_DIGITS = 8
CHUNK_ROWS = 1 << 16
# Every 16-bit number as 4 hex digits: an 8-digit id is two lookups.
_HEX4 = np.array([f"{i:04x}".encode() for i in range(1 << 16)], dtype="S4")


def write_planted_tsv(
    out: Path,
    *,
    num_train: int,
    num_eval: int = 65536,
    blank_fraction: float = 0.01,
    seed: int = 0,
    data: SyntheticDataConfig | None = None,
) -> dict[str, Any]:
    """Writes ``out/train.tsv``, ``out/eval.tsv`` and ``out/planted.json``; returns the latter."""
    cfg = data or SyntheticDataConfig(seed=seed)
    cfg.num_eval_samples = num_eval
    if any(h != 1 for h in cfg.hotness_per_feature()):
        raise ValueError(
            f"data.hotness={list(cfg.hotness)}: a Criteo line has one id per categorical "
            "field; write single-hot data (hotness=[1])"
        )
    if not 0.0 <= blank_fraction < 1.0:
        raise ValueError(f"--blank-fraction={blank_fraction} must be in [0, 1)")
    source = SyntheticCriteo(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 0xB1A2C])
    for split, num_rows in (("train", num_train), ("eval", num_eval)):
        with open(out / f"{split}.tsv", "wb") as f:
            for start in range(0, num_rows, CHUNK_ROWS):
                size = min(CHUNK_ROWS, num_rows - start)
                f.write(_lines(source.batch(split, start, size), rng, blank_fraction))
    table_rows = [c + 1 for c in cfg.cardinalities]
    info = {
        "oracle_auc": source.oracle_auc(),
        "num_train": num_train,
        "num_eval": num_eval,
        "blank_fraction": blank_fraction,
        "seed": cfg.seed,
        "table_rows": table_rows,
        "prepare": _command(out, table_rows),
    }
    (out / "planted.json").write_text(json.dumps(info, indent=2))
    return info


def prepare_overrides(out: Path, table_rows: list[int]) -> list[str]:
    """``python -m trainer.prepare`` overrides for the files under ``out``."""
    return [
        "data=criteo",
        f"data.raw=[{out / 'train.tsv'}]",
        f"data.eval_raw=[{out / 'eval.tsv'}]",
        f"data.table_rows=[{','.join(map(str, table_rows))}]",
        f"data.dir={out / 'shards'}",
    ]


def _command(out: Path, table_rows: list[int]) -> str:
    return shlex.join(["python", "-m", "trainer.prepare", *prepare_overrides(out, table_rows)])


def _lines(batch, rng: np.random.Generator, blank_fraction: float) -> bytes:
    """One TSV line per sample of ``batch``, built column-wise (no per-field Python)."""
    size = batch.labels.shape[0]
    x = batch.dense_features.double().numpy()
    dense = np.rint(np.expm1(x + DENSE_SHIFT)).astype(np.int64)
    # Single-hot and feature-major: values are [num_features * size], feature by feature.
    ids = batch.sparse_features.values().numpy().reshape(-1, size).T
    columns = np.empty((size, 1 + dense.shape[1] + ids.shape[1]), dtype="S20")
    columns[:, 0] = batch.labels.numpy().astype(np.int64).astype("S1")
    columns[:, 1 : 1 + dense.shape[1]] = dense.astype("S20")
    columns[:, 1 + dense.shape[1] :] = _hex(ids)
    blank = rng.random((size, columns.shape[1] - 1)) < blank_fraction
    columns[:, 1:][blank] = b""
    return b"".join(b"\t".join(row) + b"\n" for row in columns.tolist())


def _hex(ids: np.ndarray) -> np.ndarray:
    """Ids as fixed-width lower-case hex strings, all at once."""
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError(f"ids must be in [0, 2**32) to be written as {HEX_DIGITS} hex digits")
    return np.strings.add(_HEX4[ids >> 16], _HEX4[ids & 0xFFFF])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for train.tsv, eval.tsv, planted.json")
    parser.add_argument("--num-train", type=int, default=2_048_000)
    parser.add_argument("--num-eval", type=int, default=65536)
    parser.add_argument("--blank-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the synthetic data's data.seed")
    args = parser.parse_args()
    info = write_planted_tsv(
        args.out,
        num_train=args.num_train,
        num_eval=args.num_eval,
        blank_fraction=args.blank_fraction,
        seed=args.seed,
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
