"""What :mod:`trainer.prepare.partition_by_time` writes and hashes while it cuts a file:
a period's Parquet files, the digest of a period's rows, a row's file line.

Example::

    files = PeriodFiles(scratch, source=0)
    files.write(20788, "2026-12-01", table)      # appends to 2026-12-01-00000-00000.parquet
    digest = RowDigest(); digest.update(table); digest.hexdigest()
    files.close()                                  # {20788: [".../2026-12-01-00000-00000.parquet"]}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.data_configs import TableFormat
from trainer.data.table_lines import file_lines, malformed_lines

# Period files a task keeps open; a period met again after its file was closed
# gets another file (time-ordered input keeps one or two open).
MAX_OPEN = 32


class RowLines:
    """A data row's line in its file (malformed text rows skipped, looked up when needed)."""

    def __init__(self, path: Path, fmt: TableFormat, malformed: list[str]) -> None:
        self.path, self.fmt, self.malformed = path, fmt, malformed
        self.skipped: np.ndarray | None = None

    def of(self, rows: np.ndarray) -> list[int]:
        """The lines of 0-based data rows read so far."""
        if self.skipped is None or (self.malformed and not self.skipped.size):
            found = malformed_lines(self.path, self.fmt) if self.malformed else []
            self.skipped = np.array([line for line, _, _ in found], np.int64)
        return file_lines(rows, self.skipped, self.fmt).tolist()


class PeriodFiles:
    """Parquet files of a task's new periods, at most ``MAX_OPEN`` open."""

    def __init__(self, scratch: Path, source: int) -> None:
        self.scratch, self.source = scratch, source
        self.open: dict[int, pq.ParquetWriter] = {}
        self.files: dict[int, list[str]] = {}

    def write(self, period: int, name: str, table: pa.Table) -> None:
        writer = self.open.pop(period, None)
        if writer is None:
            if len(self.open) >= MAX_OPEN:
                self.open.pop(next(iter(self.open))).close()  # the least recently written
            paths = self.files.setdefault(period, [])
            path = self.scratch / f"{name}-{self.source:05d}-{len(paths):05d}.parquet"
            paths.append(str(path))
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        self.open[period] = writer  # last: the most recently written

    def close(self) -> dict[int, list[str]]:
        for writer in self.open.values():
            writer.close()
        self.open.clear()
        return self.files


class RowDigest:
    """sha256 of a period's rows, column by column as text; the same however the rows
    were batched (each column's value lengths and bytes go to hashers of their own)."""

    def __init__(self) -> None:
        self.hashers: dict[tuple[str, int], Any] = {}

    def update(self, table: pa.Table) -> None:
        for name in table.column_names:
            parts = _column_bytes(table.column(name).combine_chunks())
            for k, part in enumerate(parts):
                self.hashers.setdefault((name, k), hashlib.sha256()).update(part)

    def hexdigest(self) -> str:
        keys = sorted(self.hashers)
        text = "\n".join(f"{n} {k} {self.hashers[(n, k)].hexdigest()}" for n, k in keys)
        return hashlib.sha256(text.encode()).hexdigest()


def _column_bytes(array: pa.Array) -> list[bytes]:
    """A column as bytes: per value its text's length (-1: null), then the texts;
    a list column: the list lengths, then its values' bytes."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = pc.fill_null(pc.list_value_length(array), -1).to_numpy(zero_copy_only=False)
        return [lengths.astype(np.int64).tobytes(), *_column_bytes(pc.list_flatten(array))]
    try:
        text = pc.cast(array, pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        text = pc.cast(array, pa.large_binary())
    lengths = pc.fill_null(pc.binary_length(text), -1).to_numpy(zero_copy_only=False)
    _, offsets, data = text.buffers()
    ends = np.frombuffer(offsets, np.int64)[text.offset : text.offset + len(text) + 1]
    blob = b"" if data is None else np.frombuffer(data, np.uint8)[ends[0] : ends[-1]].tobytes()
    return [lengths.astype(np.int64).tobytes(), blob]
