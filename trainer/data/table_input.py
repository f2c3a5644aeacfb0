"""Parquet / CSV / TSV tables into arrays with pyarrow, a batch at a time.

The user names the columns (``data=table``): a label (with an optional
threshold: ``rating >= 4`` is a click), dense columns, single-valued id
columns (strings or integers), list-valued id columns (multi-hot: Parquet
lists, or text split on a separator) and numeric columns bucketed into a
categorical feature. Side tables (users, items) are joined by key. This module
reads the files (format, header, malformed rows, joins);
:mod:`trainer.data.table_arrays` turns each batch into arrays: every id through
its text (``5`` and ``"5"`` are the same id), its 64-bit FNV-1a hash, which
:mod:`trainer.data.vocab` then hashes into rows or counts.

Example::

    spec = TableSpec.from_config(cfg)
    for batch in read_batches(path, spec, fmt=TableFormat.parquet, batch_rows=65536):
        batch.labels, batch.dense, batch.ids[0], batch.first_row
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from trainer.data.data_configs import TableFormat
from trainer.data.table_arrays import TableBatch, TableSpec, as_text, to_arrays
from trainer.data.table_checks import TableInputError, compression, header_hint
from trainer.data.table_lines import file_lines, malformed_bad, malformed_lines


def resolve_format(path: Path, fmt: TableFormat) -> TableFormat:
    if fmt != TableFormat.auto:
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return TableFormat.parquet
    if suffix in (".tsv", ".txt"):
        return TableFormat.tsv
    if suffix in (".inter", ".user", ".item"):
        return TableFormat.atomic
    return TableFormat.csv


def column_names(path: Path, fmt: TableFormat) -> list[str]:
    """The file's column names (an atomic file's ``name:type`` header without the types;
    a UTF-8 byte order mark before a text header is not part of the first name)."""
    if fmt == TableFormat.parquet:
        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as err:
            raise TableInputError(
                f"{path}: not a Parquet file ({err}); data.format=csv or tsv reads text tables"
            ) from None
    kind = compression(path)
    if kind:
        raise TableInputError(
            f"{path} is {kind}-compressed: decompress it first (data=table reads plain "
            "CSV / TSV text and Parquet)"
        )
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    names = header.split("\t" if fmt != TableFormat.csv else ",")
    if fmt == TableFormat.atomic:
        names = [n.split(":", 1)[0] for n in names]
    return [n.strip().strip('"') for n in names]


def read_table(
    path: Path,
    fmt: TableFormat,
    columns: list[str],
    *,
    batch_rows: int,
    skip_malformed: bool = False,
) -> pa.Table:
    """A whole (side) table, only ``columns``. A text row with the wrong number of fields
    is skipped with ``skip_malformed`` (counting rows), else an error naming its line."""
    malformed: list[str] | None = [] if skip_malformed else None
    batches = [b for _, b in _raw_batches(path, fmt, columns, batch_rows, malformed)]
    if not batches:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.Table.from_batches(batches)


def _raw_batches(
    path: Path, fmt: TableFormat, columns: list[str], batch_rows: int, malformed: list[str] | None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first data row number, record batch) of ``columns``; text columns all as strings.

    A text row with the wrong number of fields is skipped, its text appended to
    ``malformed`` (pyarrow does not know its line; ``malformed_lines`` finds it);
    with ``malformed=None`` it is an error naming the file and line."""
    have = column_names(path, fmt)
    missing = [c for c in columns if c not in have]
    if missing:
        raise TableInputError(
            f"{path}: no column {missing[0]!r} (it has {', '.join(have)}); "
            "fix the column names in data.label / dense / categorical / multi_hot / buckets / joins"
            + header_hint(have, path, tabs=fmt != TableFormat.csv)
        )
    first, seen = 1, ([] if malformed is None else malformed)

    def skip_row(row: pv.InvalidRow) -> str:
        seen.append(row.text)
        return "skip"

    if fmt == TableFormat.parquet:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)
    else:
        delimiter = "," if fmt == TableFormat.csv else "\t"
        reader = pv.open_csv(
            path,
            read_options=pv.ReadOptions(column_names=have, skip_rows=1, block_size=8 << 20),
            parse_options=pv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if fmt == TableFormat.csv else False,
                invalid_row_handler=skip_row,
            ),
            convert_options=pv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
            ),
        )
        batches = iter(reader)
    for batch in itertools.chain(batches, [None]):  # None: the end, after the last check
        if malformed is None and seen:
            line, fields, expected = (malformed_lines(path, fmt) or [(0, -1, -1)])[0]
            raise TableInputError(
                f"{path}:{line}: {fields} fields, expected {expected} as in the header "
                f"({seen[0][:80]!r}); fix or remove the line"
            )
        if batch is not None:
            yield first, batch
            first += batch.num_rows


@dataclass
class Join:
    """A side table looked up by ``on``: its key and the columns it provides."""

    table: pa.Table
    on: str


def read_batches(
    path: Path,
    spec: TableSpec,
    *,
    fmt: TableFormat,
    batch_rows: int,
    joins: list[Join] = (),  # type: ignore[assignment]
) -> Iterator[TableBatch]:
    """The file's rows as arrays, ``batch_rows`` at a time (bad rows reported, not mapped;
    a text row with the wrong number of fields is one of them, in the batch of its line)."""
    from_joins = {c for j in joins for c in j.table.column_names if c != j.on}
    keys = [j.on for j in joins]
    own = [c for c in spec.columns if c not in from_joins]
    own += [k for k in keys if k not in own]
    malformed: list[str] = []
    pending: list[tuple[int, int, int]] | None = None  # malformed rows not yet reported
    skipped = np.zeros(0, np.int64)  # their lines, sorted
    first, end = 1, [(-1, None)]
    for start, batch in itertools.chain(_raw_batches(path, fmt, own, batch_rows, malformed), end):
        first = start if batch is not None else first
        if malformed and pending is None:
            pending = malformed_lines(path, fmt)
            if not pending:
                raise TableInputError(
                    f"{path}: pyarrow skipped a row with the wrong number of fields "
                    f"({malformed[0][:80]!r}) that a line-by-line read does not find; fix the row"
                )
            skipped = np.array([line for line, _, _ in pending], np.int64)
        if batch is None:  # the end: malformed rows after the last good one
            if not pending:
                return
            empty = pa.table({c: pa.array([], pa.string()) for c in spec.columns})
            out = to_arrays(path, first, empty, spec, fmt, skipped)
            out.bad += malformed_bad(pending)
            yield out
            return
        table = pa.Table.from_batches([batch])
        for join in joins:
            at = pc.index_in(as_text(table.column(join.on)), value_set=as_text(join.table[join.on]))
            side = join.table.take(at)
            for name in side.column_names:
                if name != join.on and name not in table.column_names:
                    table = table.append_column(name, side.column(name))
        out = to_arrays(path, first, table, spec, fmt, skipped)
        if pending and table.num_rows:
            last = int(file_lines(np.array([first - 2 + table.num_rows]), skipped, fmt)[0])
            out.bad = sorted(out.bad + malformed_bad([p for p in pending if p[0] < last]))
            pending = [p for p in pending if p[0] > last]
        yield out
