"""What the Criteo and table pipelines share: the error type, bad-row
bookkeeping, the output of one task, and table sizes.

Example::

    bad = BadRowLog(file="day_0", skip=False)
    bad.record(lines=[12], reasons=["non_hex_categorical"], details=["..."])  # raises
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.prepare.writer import PartResult

# How many skipped rows a metadata file names (the counts cover all of them).
MAX_EXAMPLES = 10


class PrepareError(ValueError):
    """A bad input or setting; the message names the file and line (or the key) and the fix.
    ``python -m trainer.prepare`` prints it as one line and exits with status 2."""


@dataclass
class BadRowLog:
    """Bad rows of one task: raised at once (``on_bad_row=error``) or counted."""

    file: str
    skip: bool
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def record(self, *, lines: list[int], reasons: list[str], details: list[str]) -> None:
        if not lines:
            return
        if not self.skip:
            raise PrepareError(
                f"{self.file}:{lines[0]}: {details[0]} (data.on_bad_row=skip counts and skips "
                "such rows instead)"
            )
        for line, reason, detail in zip(lines, reasons, details, strict=True):
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{self.file}:{line}: {detail}")

    @property
    def num_skipped(self) -> int:
        return sum(self.by_reason.values())


def merge_bad_rows(logs: list[BadRowLog]) -> dict:
    """The metadata's ``bad_rows``: ``{"skipped": n, "by_reason": {...}, "examples": [...]}``."""
    by_reason: dict[str, int] = {}
    examples: list[str] = []
    for log in logs:
        for reason, n in log.by_reason.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        examples.extend(log.examples)
    return {
        "skipped": sum(by_reason.values()),
        "by_reason": by_reason,
        "examples": examples[:MAX_EXAMPLES],
    }


@dataclass
class TaskOutput:
    """A task's parts by split (in order) and its bad rows."""

    parts: dict[str, list[PartResult]]
    bad: BadRowLog
    # Lines consumed per split, good or bad (for the summary).
    num_lines: dict[str, int] = field(default_factory=dict)


def per_feature(values: list[int], names: list[str], key: str) -> list[int]:
    """One value for every feature, or one per feature (``key`` names the setting)."""
    if len(values) == 1:
        return values * len(names)
    if len(values) != len(names):
        raise PrepareError(
            f"{key} has {len(values)} values but there are {len(names)} features "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); give one value "
            "for all or one per feature"
        )
    return list(values)


def id_dtype(max_rows: int) -> type:
    return np.int32 if max_rows < 2**31 else np.int64


def check_inputs(files: list[str], key: str) -> list[Path]:
    """The input files, each existing; a missing one is named with the key."""
    paths = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PrepareError(f"{key}: {name} does not exist (or is not a file)")
        paths.append(path.resolve())
    return paths


def index_tasks(tasks: Sequence[Any], sizes: Sequence[int], *, eval_fraction: float) -> None:
    """Each task's ``first_index`` among its split's rows (``sizes``: rows per task); with
    ``eval_fraction``, the train tasks' ``eval_from``: rows from there go to the eval split."""
    index = {"train": 0, "eval": 0}
    for task, size in zip(tasks, sizes, strict=True):
        task.first_index = index[task.split]
        index[task.split] += size
    if eval_fraction > 0:
        eval_from = index["train"] - int(round(index["train"] * eval_fraction))
        for task in tasks:
            if task.split == "train":
                task.eval_from = eval_from
