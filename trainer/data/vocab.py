"""Raw ids into table rows: hashing, or a frequency vocabulary counted first.

Ids are uint64 (a Criteo hex id's number, or :func:`fnv1a64` of a string id).
Row 0 is the missing value in both mappings; see
``trainer.data.data_configs`` for the rules.

Example::

    counter = IdCounter()
    counter.add(np.array([7, 7, 9], np.uint64))
    vocab = counter.vocabulary(min_count=2, max_rows=0)      # ids [7]
    map_ids(np.array([7, 9], np.uint64), np.array([True, True]), rows=3, vocab=vocab)
    # -> [2, 1]: 7 is in the vocabulary, 9 is out of it
"""

from __future__ import annotations

import numpy as np

MISSING_ROW = 0
OOV_ROW = 1
FIRST_VOCAB_ROW = 2

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of the byte strings ``data[offsets[i]:offsets[i + 1]]``.

    Vectorised over the strings: one pass per character position, so the cost
    is (number of strings) x (longest string).
    """
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    out = np.full(starts.shape, _FNV_OFFSET, dtype=np.uint64)
    if starts.size == 0:
        return out
    for k in range(int(lengths.max())):
        live = np.flatnonzero(lengths > k)
        byte = data[starts[live] + k].astype(np.uint64)
        out[live] = (out[live] ^ byte) * _FNV_PRIME
    return out


class IdCounter:
    """Counts ids in bounded batches: unique ids and their counts, merged lazily."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0

    def add(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        if counts is None:
            ids, counts = np.unique(ids, return_counts=True)
        self._ids.append(ids.astype(np.uint64))
        self._counts.append(counts.astype(np.int64))
        self._pending += ids.size
        if len(self._ids) > 8 and self._pending > 4 * self._ids[0].size:
            self._merge()

    def merge_from(self, other: IdCounter) -> None:
        ids, counts = other.totals()
        self.add(ids, counts)

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique ids and how often each was seen."""
        self._merge()
        if not self._ids:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return self._ids[0], self._counts[0]

    def vocabulary(self, *, min_count: int, max_rows: int) -> np.ndarray:
        """Kept ids in row order (row ``FIRST_VOCAB_ROW + i`` is ``ids[i]``): most frequent
        first, ties by id; ``max_rows`` > 0 caps the table (missing and OOV rows included)."""
        ids, counts = self.totals()
        keep = counts >= min_count
        ids, counts = ids[keep], counts[keep]
        order = np.lexsort((ids, -counts))
        if max_rows > 0:
            order = order[: max(max_rows - FIRST_VOCAB_ROW, 0)]
        return ids[order]

    def _merge(self) -> None:
        if len(self._ids) <= 1:
            return
        ids = np.concatenate(self._ids)
        counts = np.concatenate(self._counts)
        unique, inverse = np.unique(ids, return_inverse=True)
        self._ids = [unique]
        self._counts = [
            np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.int64)
        ]
        self._pending = 0


class Vocabulary:
    """Lookup from id to row for the ids a vocabulary kept."""

    def __init__(self, ids_in_row_order: np.ndarray) -> None:
        self.ids = ids_in_row_order.astype(np.uint64)
        order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[order]
        self._rows = (order + FIRST_VOCAB_ROW).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.ids.size) + FIRST_VOCAB_ROW

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``; ``OOV_ROW`` for ids it did not keep."""
        if self._sorted.size == 0:
            return np.full(ids.shape, OOV_ROW, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, ids), self._sorted.size - 1)
        return np.where(self._sorted[at] == ids, self._rows[at], OOV_ROW)


def map_ids(
    ids: np.ndarray, present: np.ndarray, *, rows: int, vocab: Vocabulary | None
) -> np.ndarray:
    """Table rows (int64) of ``ids``: hashed into ``rows`` rows, or looked up in ``vocab``."""
    if vocab is not None:
        out = vocab.lookup(ids)
    else:
        out = (ids % np.uint64(rows - 1)).astype(np.int64) + 1
    out[~present] = MISSING_ROW
    return out
