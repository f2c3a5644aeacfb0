"""The compression study's data sets and the arms that only MovieLens-100k runs.

``synthetic`` is the study's default job (``experiment=compression/dim64_fp32``:
26 planted tables, 207,411 rows), 500 steps of 1024. ``movielens`` is the same
model (DLRM, embedding dim 64) on MovieLens-100k as ``conf/data/movielens.yaml``
reads it (a rating >= 4 is a click; user, item, occupation, gender, genres and
age-bucket tables: 2,666 rows, the largest 1,665 items and 945 users), one epoch
of its 90,000 training rows: 351 steps of 256, as the quality study ran it.
Its files are RecBole's atomic ``ml-100k.inter/.user/.item`` (``--movielens
DIR``), prepared once under ``WORK/movielens``.

The synthetic job's QR thresholds (10,000 and 5,000 rows) split nothing on
MovieLens, so its QR arms are the plain QAT arms there; MovieLens gets its own:
QR from 1,000 rows (the item table) and from 900 rows (items and users; also
combined by add, and with m = 128 buckets instead of ceil(sqrt(rows))), and the
chooser may factorize (rank, QR) tables from 900 rows (``budget.min_rows``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The MovieLens arms that are not synthetic arms: (what it is, overrides).
MOVIELENS_ARMS: dict[str, tuple[str, list[str]]] = {
    "int8": ("int8 QAT", ["qat=int8"]),
    "qr1k_int8": ("QR mul (>= 1k rows), int8 QAT", ["model.qr_min_rows=1000", "qat=int8"]),
    "qr1k_int4": ("QR mul (>= 1k rows), int4 QAT", ["model.qr_min_rows=1000", "qat=int4"]),
    "qr900_int8": ("QR mul (>= 900 rows), int8 QAT", ["model.qr_min_rows=900", "qat=int8"]),
    "qr900_int4": ("QR mul (>= 900 rows), int4 QAT", ["model.qr_min_rows=900", "qat=int4"]),
    "qr900_int2": ("QR mul (>= 900 rows), int2 QAT", ["model.qr_min_rows=900", "qat=int2"]),
    "qr900add_int4": (
        "QR add (>= 900 rows), int4 QAT",
        ["model.qr_min_rows=900", "model.qr_op=add", "qat=int4"],
    ),
    "qr900m128_int4": (
        "QR mul m=128 (>= 900 rows), int4 QAT",
        ["model.qr_min_rows=900", "model.qr_buckets=128", "qat=int4"],
    ),
    "qr900m128_int2": (
        "QR mul m=128 (>= 900 rows), int2 QAT",
        ["model.qr_min_rows=900", "model.qr_buckets=128", "qat=int2"],
    ),
}
# The synthetic arms that mean something on MovieLens (its QR thresholds split nothing there).
MOVIELENS_SHARED = [
    "fp32",
    "int4",
    "int2",
    "int2_prune",
    "rank8_int4",
    "mixed05_int8",
    "qr1k_int2",
    "distill_int8",
    "budget_10x",
    "budget_20x",
    "budget_50x",
]
MOVIELENS_STEPS, MOVIELENS_BATCH = 351, 256
DEFAULT_STEPS = {"synthetic": 500, "movielens": MOVIELENS_STEPS}


def movielens_overrides(work: Path, raw: Path) -> list[str]:
    """``data=movielens`` overrides of ``raw``'s files, prepared under ``work`` once."""
    from benchmarks.studies.defaults import datasets  # hydra compose + prepare: load lazily

    if not (raw / "ml-100k.inter").is_file():
        raise SystemExit(f"--movielens {raw}: no ml-100k.inter there (RecBole's ml-100k files)")
    dataset = next(datasets(work.resolve(), ["movielens"], raw.resolve()))
    return [
        *dataset.overrides,
        f"trainer.batch_size={MOVIELENS_BATCH}",
        "budget.min_rows=900",
    ]


def table_rows(data: dict[str, Any]) -> list[int]:
    """Rows of each table of a resolved ``data`` config: its cardinalities, else the
    prepared data's ``metadata.json`` (a table data set)."""
    if data.get("cardinalities"):
        return [int(n) for n in data["cardinalities"]]
    meta = json.loads((Path(data["dir"]) / "metadata.json").read_text())
    return [int(f["num_embeddings"]) for f in meta["features"]]
