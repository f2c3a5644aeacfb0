"""The on-disk layout of prepared data: what ``python -m trainer.prepare`` writes
and the memory-mapped shard source reads.

One directory per prepared data set::

    DIR/metadata.json
    DIR/train/part-00000/labels.npy            float32 [n]
    DIR/train/part-00000/dense.npy             float32 [n, num_dense]  (-0.0: missing)
    DIR/train/part-00000/<feature>.offsets.npy int64   [n + 1]  (offsets[0] == 0)
    DIR/train/part-00000/<feature>.values.npy  int32 (or int64 when rows >= 2**31) [offsets[-1]]
    DIR/train/part-00001/...
    DIR/eval/part-00000/...

A missing dense value (an empty field) is stored as ``-0.0``: equal to 0 in
any arithmetic (Criteo's convention, an empty count is 0), yet told apart by
its sign bit, so that standardization can put it at the column's mean.

Arrays are plain ``.npy`` files (``np.load(path, mmap_mode="r")``). A sample
``i`` of a part has, in feature ``f``, the ids
``values[offsets[i]:offsets[i + 1]]`` (already mapped into ``[0, rows_f)``):
per feature, so that a contiguous block of samples is one slice per feature,
exactly torchrec's feature-major ``KeyedJaggedTensor`` layout.

``metadata.json`` (see :class:`ShardMetadata`) holds the row counts, the
features (name, table rows, mean and max ids per sample), the mapping used
(hash or vocabulary, ``min_count``), the prepare settings' fingerprint, the
inputs (path, size, mtime), the bad-row counts, the train split's per-column
dense mean and std, a checksum of every array, and the data.* settings prepare
ran with (label, columns, transforms, joins, format ...: how raw rows become
these arrays).

Example::

    meta = ShardMetadata.read(Path("data/criteo"))
    meta.splits["train"].num_rows
    [f.name for f in meta.features]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.source import FeatureSpec

FORMAT = "shardrec-shards"
VERSION = 1
METADATA_FILE = "metadata.json"
LABELS_FILE = "labels.npy"
DENSE_FILE = "dense.npy"


def offsets_file(feature: str) -> str:
    return f"{feature}.offsets.npy"


def values_file(feature: str) -> str:
    return f"{feature}.values.npy"


@dataclass
class PartInfo:
    path: str  # relative to the data directory, e.g. "train/part-00000"
    num_rows: int


@dataclass
class SplitInfo:
    num_rows: int
    parts: list[PartInfo] = field(default_factory=list)


@dataclass
class ShardMetadata:
    source: str  # "criteo" | "table"
    num_dense: int
    features: list[FeatureSpec]
    splits: dict[str, SplitInfo]
    # {"kind": "hash" | "vocab", "min_count": ..., ...}: how raw ids became rows.
    mapping: dict[str, Any]
    # Hash of the prepare settings that shape the arrays (a run refuses other shards).
    fingerprint: str
    # sha256 over every array file, in a fixed order.
    checksum: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # {"skipped": n, "by_reason": {...}} under data.on_bad_row=skip.
    bad_rows: dict[str, Any] = field(default_factory=dict)
    dense_names: list[str] = field(default_factory=list)
    # {"count": [...], "mean": [...], "std": [...]}: per dense column, over the present
    # (not missing) values of the train split only (float64 sums, population std);
    # the reader standardizes with them.
    dense_stats: dict[str, Any] = field(default_factory=dict)
    # The data.* settings prepare ran with (trainer.prepare.recorded_settings: those in
    # the fingerprint), so an export describes the raw rows when the run's data config
    # does not repeat them; {} in metadata written before they were recorded.
    settings: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def write(self, directory: Path) -> Path:
        path = directory / METADATA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(path)  # a half-written metadata file never looks complete
        return path

    @classmethod
    def read(cls, directory: Path) -> ShardMetadata:
        """Raises FileNotFoundError / ValueError naming the file and the fix."""
        path = directory / METADATA_FILE
        if not path.is_file() and (directory / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{directory} is a partitioned dataset (manifest.json, trainer.data.partitions): "
                "train on its partitions as they come with online.follow=true, or on one with "
                f"data.dir={directory}/partitions/<name>"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: data.dir must be a directory written by "
                f"`python -m trainer.prepare` (run it first)"
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(
                f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}; prepare the data again"
            )
        raw["features"] = [FeatureSpec(**f) for f in raw["features"]]
        raw["splits"] = {
            name: SplitInfo(
                num_rows=s["num_rows"], parts=[PartInfo(**p) for p in s.get("parts", [])]
            )
            for name, s in raw["splits"].items()
        }
        return cls(**raw)
