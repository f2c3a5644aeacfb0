"""The on-disk layout of a partitioned dataset: days (or hours) of data, one id mapping.

``python -m trainer.prepare ... data.partition=NAME`` writes one partition at a
time into the same ``data.dir`` and appends it to ``manifest.json``; follow mode
(trainer/online/follow.py) reads the manifest and trains the partitions in its
order::

    DIR/manifest.json                     the partitions, in order (written last)
    DIR/partitions/day_0/metadata.json    a whole prepared directory
    DIR/partitions/day_0/train/part-*/... (layout: trainer.data.shard_format)
    DIR/partitions/day_0/eval/part-*/...
    DIR/partitions/day_0/vocab/<feature>.ids.npy   mapping=vocab: vocabulary version 0
    DIR/partitions/day_1/...                       ... and version 1 (a superset)

Each partition is an ordinary prepared directory (``data.dir=DIR/partitions/day_0``
trains on it alone). With ``mapping=vocab`` a partition's vocabulary is the one
it was prepared with: the previous partition's ids, in their rows, then the new
ids that reached ``min_count`` in this partition, appended; an id that has a row
never gets another. A partition directory is renamed into place complete and
only then listed in the manifest (itself replaced atomically), so a reader of
the manifest never sees a partition being written.

Example::

    manifest = Manifest.read(Path("data/days"))
    [p.name for p in manifest.partitions]      # ["day_0", "day_1"]
    manifest.entry("day_1").path                # "partitions/day_1"
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
PARTITIONS_DIR = "partitions"
FORMAT = "shardrec-partitions"
VERSION = 1


@dataclass
class PartitionEntry:
    name: str
    path: str  # relative to the dataset directory: "partitions/<name>"
    # The partition's prepare fingerprint (its metadata.json's): settings and inputs.
    fingerprint: str
    # Rows per split, e.g. {"train": 9500, "eval": 500}.
    num_rows: dict[str, int]
    # Rows of each feature's table (the FeatureSpec's num_embeddings), in feature order.
    table_rows: list[int]
    # mapping=vocab: the vocabulary version (the partition's index); None for hash.
    vocab_version: int | None = None
    # Per feature, how many ids the vocabulary holds after this partition.
    vocab_ids: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    source: str  # "criteo" | "table"
    mapping: str  # "hash" | "vocab"
    # The prepare settings every partition shares (raw files and names excluded).
    settings: dict[str, Any]
    partitions: list[PartitionEntry] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.partitions]

    def entry(self, name: str) -> PartitionEntry | None:
        return next((p for p in self.partitions if p.name == name), None)

    def write(self, directory: Path) -> Path:
        """Replaces ``manifest.json`` atomically (a reader sees the old or the new one)."""
        path = directory / MANIFEST_FILE
        tmp = directory / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Raises FileNotFoundError / ValueError naming the file and the fix."""
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a partitioned dataset is written by `python -m "
                f"trainer.prepare ... data.dir={directory} data.partition=NAME` (run it first)"
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(
                f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}; prepare the partitions again"
            )
        raw["partitions"] = [PartitionEntry(**p) for p in raw["partitions"]]
        return cls(**raw)


def is_partitioned(directory: Path) -> bool:
    return (directory / MANIFEST_FILE).is_file()
