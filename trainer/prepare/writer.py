"""Streaming one part of a split to ``.npy`` files in bounded memory.

A part's arrays (layout in ``trainer.data.shard_format``) are appended chunk by
chunk: each ``.npy`` file gets a fixed-size header first, rewritten with the
final shape on :meth:`PartWriter.close`, so no array is ever held whole.

Example::

    writer = PartWriter(Path("tmp/train/part-00000"), features=["cat_0"], num_dense=13,
                        id_dtype=np.int32)
    writer.append(labels, dense, [(None, rows_cat_0)])    # None: one id per sample
    info = writer.close()                      # rows, digests, ids per feature, dense moments
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data.shard_format import DENSE_FILE, LABELS_FILE, offsets_file, values_file

_HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + dict, a multiple of 64


class NpyStream:
    """An ``.npy`` file written by appending rows; the header is fixed up on close."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...] = ()) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        self.num_rows = 0
        self._digest = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self._file.write(b"\0" * _HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype)
        assert data.shape[1:] == self.row_shape, (data.shape, self.row_shape)
        self.num_rows += data.shape[0]
        if data.size == 0:  # e.g. no dense columns: rows of width 0, no bytes
            return
        raw = memoryview(data.reshape(-1)).cast("B")
        self._file.write(raw)
        self._digest.update(raw)

    def close(self) -> str:
        """Writes the header; returns the sha256 of the data bytes."""
        shape = (self.num_rows, *self.row_shape)
        descr = np.lib.format.dtype_to_descr(self.dtype)
        header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
        header = header.encode("latin1")
        room = _HEADER_BYTES - 10
        assert len(header) < room, header
        header = header + b" " * (room - 1 - len(header)) + b"\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + header)
        self._file.close()
        return self._digest.hexdigest()


@dataclass
class DenseMoments:
    """Per-column count, mean and sum of squared deviations (float64) of the present
    values (a missing one is stored as -0.0, see ``trainer.data.shard_format``).

    Chunks and parts are merged with Chan et al.'s pairwise update, so the
    result does not depend on how the rows were cut (up to float64 rounding)."""

    count: np.ndarray  # int64 [num_dense]
    mean: np.ndarray  # float64 [num_dense]
    m2: np.ndarray  # float64 [num_dense]

    @classmethod
    def empty(cls, num_dense: int) -> DenseMoments:
        return cls(np.zeros(num_dense, np.int64), np.zeros(num_dense), np.zeros(num_dense))

    @classmethod
    def of(cls, dense: np.ndarray) -> DenseMoments:
        x = np.asarray(dense, dtype=np.float64)
        present = ~missing_dense(x)
        count = present.sum(axis=0)
        mean = np.where(present, x, 0.0).sum(axis=0) / np.maximum(count, 1)
        m2 = np.where(present, (x - mean) ** 2, 0.0).sum(axis=0)
        return cls(count.astype(np.int64), mean, m2)

    def merge(self, other: DenseMoments) -> DenseMoments:
        n = self.count + other.count
        share = other.count / np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + delta**2 * self.count * share
        return DenseMoments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), as ``np.std``."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


def missing_dense(dense: np.ndarray) -> np.ndarray:
    """Where a dense value is missing: stored as -0.0 (see ``trainer.data.shard_format``)."""
    return (dense == 0) & np.signbit(dense)


@dataclass
class PartResult:
    """What a closed part holds: rows, ids per feature, sha256 per file (name: digest),
    and its dense columns' moments (for the train split's standardization)."""

    path: Path
    num_rows: int
    num_ids: list[int]
    max_ids: list[int]
    digests: dict[str, str] = field(default_factory=dict)
    dense_moments: DenseMoments | None = None


class PartWriter:
    """One ``<split>/part-NNNNN`` directory: labels, dense, offsets and values per feature."""

    def __init__(self, path: Path, *, features: list[str], num_dense: int, id_dtype: type) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.features = features
        self.labels = NpyStream(path / LABELS_FILE, np.float32)
        self.dense = NpyStream(path / DENSE_FILE, np.float32, (num_dense,))
        self.offsets = [NpyStream(path / offsets_file(f), np.int64) for f in features]
        self.values = [NpyStream(path / values_file(f), id_dtype) for f in features]
        for stream in self.offsets:
            stream.append(np.zeros(1, np.int64))
        self._num_ids = [0] * len(features)
        self._max_ids = [0] * len(features)
        self._moments = DenseMoments.empty(num_dense)

    def append(
        self,
        labels: np.ndarray,
        dense: np.ndarray,
        ids: list[tuple[np.ndarray | None, np.ndarray]],
    ) -> None:
        """``ids[f]`` is ``(lengths, rows)``: ids per sample (None: exactly one) and the rows."""
        n = labels.shape[0]
        if n == 0:
            return
        self.labels.append(labels)
        self.dense.append(dense)
        # Of the float32 values written, so the stats are those of the shards' bytes.
        self._moments = self._moments.merge(DenseMoments.of(np.asarray(dense, np.float32)))
        one_each = np.arange(1, n + 1, dtype=np.int64)  # the offsets' steps of single-hot bags
        for f, (lengths, rows) in enumerate(ids):
            if lengths is None:
                ends = one_each
                longest = 1
            else:
                ends = np.cumsum(lengths, dtype=np.int64)
                longest = int(lengths.max())
            self.offsets[f].append(ends + self._num_ids[f])
            self.values[f].append(rows)
            self._num_ids[f] += int(rows.shape[0])
            self._max_ids[f] = max(self._max_ids[f], longest)

    @property
    def num_rows(self) -> int:
        return self.labels.num_rows

    def close(self) -> PartResult:
        streams = [self.labels, self.dense, *self.offsets, *self.values]
        digests = {s.path.name: s.close() for s in streams}
        return PartResult(
            self.path, self.num_rows, self._num_ids, self._max_ids, digests, self._moments
        )
