r"""Batches gathered from memory-mapped shard parts, without per-sample Python.

A split is a list of :class:`Part`\ s (one cumulative row index over them);
:class:`Rows` cuts a batch out of it, either as a contiguous row range (one
slice per part and feature) or as any list of rows (sorted gathers from the
maps, then put back in the asked order). Per feature, a bag of sample ``i``
is ``values[offsets[i]:offsets[i + 1]]``; gathering bags is index arithmetic::

    lengths = offsets[rows + 1] - offsets[rows]
    positions = repeat(offsets[rows] - exclusive_cumsum(lengths), lengths) + arange(sum)
    values[positions]

A single-hot feature (exactly one id per sample) skips the offsets altogether.
:meth:`Arrays.to_batch` gives torchrec's ``Batch`` with the ``KeyedJaggedTensor``
in its feature-major layout.

Example::

    rows = Rows(parts, num_features=26, num_dense=13)
    rows.gather(np.array([5, 0, 17])).to_batch(keys)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Part:
    """One part's memory-mapped arrays: rows ``[start, start + num_rows)`` of its split."""

    path: Path
    start: int
    num_rows: int
    labels: np.ndarray
    dense: np.ndarray
    # Per feature, int64 [num_rows + 1]; None: exactly one id per sample (offsets 0..n).
    offsets: list[np.ndarray | None]
    values: list[np.ndarray]  # per feature


class Rows:
    """Rows of a split (all its parts, one cumulative row index) that batches gather from."""

    def __init__(self, parts: list[Part], num_features: int, num_dense: int) -> None:
        self.parts = parts
        self.num_features = num_features
        self.num_dense = num_dense
        self.starts = np.array([p.start for p in parts] + [_end(parts)], dtype=np.int64)

    def contiguous(self, begin: int, end: int) -> Arrays:
        """Rows ``[begin, end)``: slices of each part they touch."""
        pieces = []
        for i in self._parts_between(begin, end):
            part = self.parts[i]
            lo, hi = max(begin - part.start, 0), min(end - part.start, part.num_rows)
            lengths = [None if off is None else np.diff(off[lo : hi + 1]) for off in part.offsets]
            values = [
                val[lo:hi] if off is None else val[off[lo] : off[hi]]
                for off, val in zip(part.offsets, part.values, strict=True)
            ]
            pieces.append(Arrays(part.labels[lo:hi], part.dense[lo:hi], lengths, values))
        return Arrays.concat(pieces, self.num_features, self.num_dense)

    def gather(self, rows: np.ndarray) -> Arrays:
        """Rows ``rows`` (any order) in that order: sorted gathers from the maps, then reordered."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.searchsorted(sorted_rows, self.starts)
        pieces = []
        for i, part in enumerate(self.parts):
            if bounds[i] == bounds[i + 1]:
                continue
            local = sorted_rows[bounds[i] : bounds[i + 1]] - part.start
            lengths, values = [], []
            for off, val in zip(part.offsets, part.values, strict=True):
                if off is None:  # single-hot: the id of sample i is values[i]
                    lengths.append(None)
                    values.append(val[local])
                    continue
                begins = off[local]
                lengths.append(off[local + 1] - begins)
                values.append(val[_positions(begins, lengths[-1])])
            pieces.append(Arrays(part.labels[local], part.dense[local], lengths, values))
        in_sorted_order = Arrays.concat(pieces, self.num_features, self.num_dense)
        return in_sorted_order.take(np.argsort(order))

    def _parts_between(self, begin: int, end: int) -> range:
        first = int(np.searchsorted(self.starts, begin, side="right")) - 1
        last = int(np.searchsorted(self.starts, end, side="left"))
        return range(max(first, 0), min(last, len(self.parts)))


@dataclass
class Arrays:
    """A batch as numpy arrays; lengths and values per feature."""

    labels: np.ndarray
    dense: np.ndarray
    lengths: list[np.ndarray | None]  # None: one id per sample
    values: list[np.ndarray]

    @staticmethod
    def concat(pieces: list[Arrays], num_features: int, num_dense: int) -> Arrays:
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            empty = np.zeros(0, dtype=np.int64)
            return Arrays(
                np.zeros(0, np.float32),
                np.zeros((0, num_dense), np.float32),
                [empty] * num_features,
                [empty] * num_features,
            )
        return Arrays(
            np.concatenate([p.labels for p in pieces]),
            np.concatenate([p.dense for p in pieces]),
            [_concat_lengths(pieces, f) for f in range(num_features)],
            [np.concatenate(x) for x in zip(*(p.values for p in pieces), strict=True)],
        )

    def take(self, rows: np.ndarray) -> Arrays:
        """Rows ``rows`` of this (in-memory) batch."""
        values = []
        for lengths, vals in zip(self.lengths, self.values, strict=True):
            if lengths is None:
                values.append(vals[rows])
                continue
            begins = np.cumsum(lengths) - lengths
            values.append(vals[_positions(begins[rows], lengths[rows])])
        lengths = [None if n is None else n[rows] for n in self.lengths]
        return Arrays(self.labels[rows], self.dense[rows], lengths, values)

    def to_batch(
        self, keys: list[str], *, dense_norm: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Batch:
        """``dense_norm = (mean, inv_std)`` (float32 per column): dense becomes
        ``(x - mean) * inv_std`` and a missing value (stored -0.0) the mean, 0;
        None: as stored (a missing value 0). Vectorised over the batch."""
        num_samples = self.labels.shape[0]
        # np.array copies: the batch must not keep (read-only) pages of the maps.
        dense = np.array(self.dense, dtype=np.float32)
        if dense_norm is not None:
            missing = (dense == 0) & np.signbit(dense)
            dense -= dense_norm[0]
            dense *= dense_norm[1]
            dense[missing] = 0.0  # mean imputation
        else:
            dense += 0.0  # -0.0 (missing) becomes 0.0: the raw values, bit for bit
        lengths = np.concatenate(
            [
                np.ones(num_samples, np.int32) if n is None else n.astype(np.int32)
                for n in self.lengths
            ]
        )
        lengths = torch.from_numpy(lengths)
        values = torch.from_numpy(np.concatenate(self.values).astype(np.int64))
        return Batch(
            dense_features=torch.from_numpy(dense),
            # torchrec's layout: feature-major (all of feature 0's bags, then 1's ...).
            sparse_features=KeyedJaggedTensor.from_lengths_sync(
                keys=keys, values=values, lengths=lengths
            ),
            labels=torch.from_numpy(np.array(self.labels, dtype=np.float32)),
        )


def _concat_lengths(pieces: list[Arrays], feature: int) -> np.ndarray | None:
    lengths = [p.lengths[feature] for p in pieces]
    if all(n is None for n in lengths):
        return None
    return np.concatenate(
        [np.ones(len(p.labels), np.int64) if n is None else n for p, n in zip(pieces, lengths)]
    )


def _positions(begins: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the bags ``[begins[i], begins[i] + lengths[i])``, concatenated."""
    out_begins = np.cumsum(lengths) - lengths
    return np.repeat(begins - out_begins, lengths) + np.arange(int(lengths.sum()))


def _end(parts: list[Part]) -> int:
    return parts[-1].start + parts[-1].num_rows if parts else 0
