"""Tiny prepared-shard directories for tests, written with numpy after
``trainer.data.shard_format`` (what ``python -m trainer.prepare`` writes).

Every sample carries its identity: ``dense[:, 0]`` is its row number within
the split (plus ``1e6`` in the eval split), so a test can tell which rows a
batch holds; ``dense_stats`` in the metadata are the train rows' own mean and
std, except column 0's (0 and 1, so that standardizing keeps the identity).
Features are ``(name, rows, max ids per sample)``; a feature with
``max > 1`` is multi-hot with bag lengths in ``[0, max]``.

Example::

    write_shards(tmp_path, {"train": [40, 24], "eval": [16]},
                 features=[("a", 50, 1), ("b", 7, 3)])
    ShardSource(tmp_path, seed=0)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from trainer.data.shard_format import (
    DENSE_FILE,
    LABELS_FILE,
    PartInfo,
    ShardMetadata,
    SplitInfo,
    offsets_file,
    values_file,
)
from trainer.data.source import FeatureSpec

EVAL_ID_BASE = 1_000_000
Feature = tuple[str, int, int]
DEFAULT_FEATURES: list[Feature] = [("single", 50, 1), ("multi", 7, 3)]


def write_shards(
    directory: Path,
    part_rows: dict[str, list[int]],
    *,
    features: list[Feature] = DEFAULT_FEATURES,
    num_dense: int = 3,
    seed: int = 0,
    fingerprint: str = "fp-test",
) -> ShardMetadata:
    """Writes ``directory`` with parts of ``part_rows[split]`` rows each; returns its metadata."""
    rng = np.random.default_rng(seed)
    splits, digest, total_ids = {}, hashlib.sha256(), {name: 0 for name, _, _ in features}
    train_dense = []
    for split, sizes in part_rows.items():
        infos, start = [], 0
        for p, num_rows in enumerate(sizes):
            rel = f"{split}/part-{p:05d}"
            base = EVAL_ID_BASE if split == "eval" else 0
            arrays = _part_arrays(rng, start + base, num_rows, features, num_dense)
            (directory / rel).mkdir(parents=True, exist_ok=True)
            if split == "train":
                train_dense.append(arrays[DENSE_FILE].astype(np.float64))
            for name, array in arrays.items():
                np.save(directory / rel / name, array)
                digest.update(array.tobytes())
            for name, _, _ in features:
                total_ids[name] += int(arrays[offsets_file(name)][-1])
            infos.append(PartInfo(path=rel, num_rows=num_rows))
            start += num_rows
        splits[split] = SplitInfo(num_rows=start, parts=infos)
    num_samples = sum(s.num_rows for s in splits.values())
    dense = np.concatenate(train_dense) if train_dense else np.zeros((0, num_dense))
    mean, std = dense.mean(axis=0), dense.std(axis=0)
    mean[:1], std[:1] = 0.0, 1.0
    meta = ShardMetadata(
        source="table",
        num_dense=num_dense,
        features=[
            FeatureSpec(
                name=name,
                num_embeddings=rows,
                ids_per_sample=total_ids[name] / max(num_samples, 1),
                max_ids_per_sample=hot,
            )
            for name, rows, hot in features
        ],
        splits=splits,
        mapping={"kind": "hash"},
        fingerprint=fingerprint,
        checksum=digest.hexdigest(),
        dense_stats={"count": len(dense), "mean": mean.tolist(), "std": std.tolist()},
    )
    meta.write(directory)
    return meta


def _part_arrays(
    rng: np.random.Generator, first_id: int, num_rows: int, features: list[Feature], num_dense: int
) -> dict[str, np.ndarray]:
    dense = rng.normal(size=(num_rows, num_dense)).astype(np.float32)
    dense[:, 0] = np.arange(first_id, first_id + num_rows)
    arrays = {
        LABELS_FILE: (rng.random(num_rows) < 0.3).astype(np.float32),
        DENSE_FILE: dense,
    }
    for name, rows, hot in features:
        lengths = np.ones(num_rows, np.int64) if hot == 1 else rng.integers(0, hot + 1, num_rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[offsets_file(name)] = offsets
        arrays[values_file(name)] = rng.integers(0, rows, int(offsets[-1])).astype(np.int32)
    return arrays


def sample_ids(batch) -> list[int]:
    """The identities (see the module docstring) of a batch's samples, in order."""
    return batch.dense_features[:, 0].round().long().tolist()


def bags(batch) -> dict[str, list[list[int]]]:
    """Per feature, each sample's ids: a batch's sparse features as plain lists."""
    out = {}
    for key, jt in batch.sparse_features.to_dict().items():
        out[key] = [t.tolist() for t in jt.to_dense()]
    return out
