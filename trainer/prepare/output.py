"""What a source's pipeline hands back to :func:`trainer.prepare.prepare`, and
the vocabulary files both pipelines write.

Example::

    rows = write_vocabularies(work, ["cat_0"], task_counts, min_count=3, max_rows=[0])
    out = PipelineOutput.collect(task_outputs, features=["cat_0"], rows=rows, num_dense=13,
                                 dense_names=[...])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.source import FeatureSpec
from trainer.data.vocab import FIRST_VOCAB_ROW, IdCounter
from trainer.prepare.common import BadRowLog, TaskOutput, merge_bad_rows
from trainer.prepare.writer import DenseMoments, PartResult

VOCAB_DIR = "vocab"


def vocab_path(directory: Path, feature: str) -> Path:
    """Kept raw ids (uint64) in row order: row ``2 + i`` is ``ids[i]``."""
    return directory / VOCAB_DIR / f"{feature}.ids.npy"


def write_vocabularies(
    work: Path,
    features: list[str],
    task_counts: list[list[tuple[np.ndarray, np.ndarray]]],
    *,
    min_count: int,
    max_rows: list[int],
    base: Path | None = None,
    fixed_rows: bool = False,
) -> list[int]:
    """Merges the tasks' id counts, writes one vocabulary per feature; returns table rows.

    ``base``: a directory holding the previous partition's vocabularies, extended
    (:func:`extend_vocabulary`), never renumbered. ``fixed_rows`` (a partition):
    a table has ``max_rows`` rows whatever its vocabulary holds (0: as many as kept),
    so that every partition's tables have the same size."""
    (work / VOCAB_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for f, feature in enumerate(features):
        counter = IdCounter()
        for counts in task_counts:
            counter.add(*counts[f])
        if base is None:
            kept = counter.vocabulary(min_count=min_count, max_rows=max_rows[f])
        else:
            old = np.load(vocab_path(base, feature))
            kept = extend_vocabulary(old, counter, min_count=min_count, max_rows=max_rows[f])
        np.save(vocab_path(work, feature), kept)
        rows.append(max_rows[f] if fixed_rows and max_rows[f] > 0 else int(kept.size) + 2)
    return rows


def extend_vocabulary(
    old: np.ndarray, counter: IdCounter, *, min_count: int, max_rows: int
) -> np.ndarray:
    """``old`` (ids in row order) then the counted ids not in it that reached
    ``min_count``, most frequent first (ties by id), while ``max_rows`` (> 0) has room.

    An id of ``old`` keeps its row even if this partition never saw it."""
    ids, counts = counter.totals()
    keep = (counts >= min_count) & ~np.isin(ids, old)
    ids, counts = ids[keep], counts[keep]
    order = np.lexsort((ids, -counts))
    if max_rows > 0:
        order = order[: max(max_rows - FIRST_VOCAB_ROW - old.size, 0)]
    return np.concatenate([old.astype(np.uint64), ids[order]])


@dataclass
class PipelineOutput:
    parts: dict[str, list[PartResult]]
    features: list[FeatureSpec]
    num_dense: int
    dense_names: list[str]
    bad_rows: dict[str, Any]
    num_lines: dict[str, int] = field(default_factory=dict)
    # Per-column count / mean / std of the train split's dense values (never eval's).
    dense_stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def collect(
        cls,
        outputs: list[TaskOutput],
        *,
        features: list[str],
        rows: list[int],
        num_dense: int,
        dense_names: list[str],
        extra_bad: list[BadRowLog] = (),  # type: ignore[assignment]
    ) -> PipelineOutput:
        parts: dict[str, list[PartResult]] = {}
        num_lines: dict[str, int] = {}
        for out in outputs:
            for split, results in out.parts.items():
                parts.setdefault(split, []).extend(r for r in results if r.num_rows > 0)
            for split, n in out.num_lines.items():
                num_lines[split] = num_lines.get(split, 0) + n
        train = parts.get("train", [])
        num_train = sum(p.num_rows for p in train)
        specs = []
        for f, name in enumerate(features):
            num_ids = sum(p.num_ids[f] for p in train)
            specs.append(
                FeatureSpec(
                    name=name,
                    num_embeddings=int(rows[f]),
                    ids_per_sample=num_ids / num_train if num_train else 1.0,
                    max_ids_per_sample=max((p.max_ids[f] for p in train), default=1),
                )
            )
        moments = DenseMoments.empty(num_dense)
        for part in train:  # row order: the merge is the same whatever the worker count
            if part.dense_moments is not None:
                moments = moments.merge(part.dense_moments)
        return cls(
            parts=parts,
            features=specs,
            num_dense=num_dense,
            dense_names=dense_names,
            bad_rows=merge_bad_rows([*extra_bad, *(o.bad for o in outputs)]),
            num_lines=num_lines,
            dense_stats={
                "count": moments.count.tolist(),  # present (non-missing) values
                "mean": moments.mean.tolist(),
                "std": moments.std.tolist(),
            },
        )
