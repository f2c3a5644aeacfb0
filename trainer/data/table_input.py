"""Parquet / CSV / TSV tables into arrays with pyarrow, a batch at a time.

The user names the columns (``data=table``): a label (with an optional
threshold: ``rating >= 4`` is a click), dense columns, single-valued id
columns (strings or integers), list-valued id columns (multi-hot: Parquet
lists, or text split on a separator) and numeric columns bucketed into a
categorical feature. Side tables (users, items) are joined by key. Every id is
mapped through its text (``5`` and ``"5"`` are the same id): its 64-bit FNV-1a
hash, which :mod:`trainer.data.vocab` then hashes into rows or counts.

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

from trainer.data.data_configs import DenseTransform, TableDataConfig, TableFormat
from trainer.data.table_checks import TableInputError, check_types, compression, header_hint
from trainer.data.table_lines import file_lines, malformed_bad, malformed_lines
from trainer.data.vocab import fnv1a64


@dataclass
class FeatureIds:
    """One feature of a batch: per row, ``lengths`` ids (None: exactly one) ``ids``;
    ``present`` marks the single-valued ids that were not missing."""

    ids: np.ndarray  # uint64
    lengths: np.ndarray | None
    present: np.ndarray | None
    # Buckets are rows already (row 1 + bucket), not ids to hash.
    direct: bool = False


@dataclass
class TableBatch:
    first_row: int  # 1-based data row of the batch's first row in its file
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, d]
    ids: list[FeatureIds]
    # (line or row number, reason, detail) of bad rows, already removed from the arrays.
    bad: list[tuple[int, str, str]]
    # 0-based index in the file's data rows of each row kept.
    rows: np.ndarray


@dataclass
class TableSpec:
    label: str
    label_threshold: float | None
    dense: list[str]
    dense_transform: DenseTransform
    categorical: list[str]
    multi_hot: list[str]
    list_separator: str
    buckets: dict[str, list[float]]

    @classmethod
    def from_config(cls, cfg: TableDataConfig) -> TableSpec:
        return cls(
            cfg.label,
            cfg.label_threshold,
            list(cfg.dense),
            cfg.dense_transform,
            list(cfg.categorical),
            list(cfg.multi_hot),
            cfg.list_separator,
            {k: sorted(v) for k, v in cfg.buckets.items()},
        )

    @property
    def feature_names(self) -> list[str]:
        return [*self.categorical, *self.multi_hot, *(f"{c}_bucket" for c in self.buckets)]

    @property
    def columns(self) -> list[str]:
        cols = [self.label, *self.dense, *self.categorical, *self.multi_hot, *self.buckets]
        return [c for c in dict.fromkeys(cols) if c]  # no label: predict's unlabelled rows

    @property
    def roles(self) -> list[tuple[str, str]]:
        """(column, the data.* key naming it) for every column read."""
        roles = [(self.label, "data.label"), *((c, "data.dense") for c in self.dense)]
        roles += [(c, "data.buckets") for c in self.buckets]
        roles += [(c, "data.categorical") for c in self.categorical]
        return roles + [(c, "data.multi_hot") for c in self.multi_hot]


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
            out = _to_arrays(path, first, empty, spec, fmt, skipped)
            out.bad += malformed_bad(pending)
            yield out
            return
        table = pa.Table.from_batches([batch])
        for join in joins:
            at = pc.index_in(
                _as_text(table.column(join.on)), value_set=_as_text(join.table[join.on])
            )
            side = join.table.take(at)
            for name in side.column_names:
                if name != join.on and name not in table.column_names:
                    table = table.append_column(name, side.column(name))
        out = _to_arrays(path, first, table, spec, fmt, skipped)
        if pending and table.num_rows:
            last = int(file_lines(np.array([first - 2 + table.num_rows]), skipped, fmt)[0])
            out.bad = sorted(out.bad + malformed_bad([p for p in pending if p[0] < last]))
            pending = [p for p in pending if p[0] > last]
        yield out


def _to_arrays(
    path: Path, first: int, table: pa.Table, spec: TableSpec, fmt: TableFormat, skipped: np.ndarray
) -> TableBatch:
    check_types(path, table, spec.roles)
    n = table.num_rows
    bad: list[tuple[int, str, str]] = []

    def line(i: int) -> int:
        return int(file_lines(np.array([first - 1 + i]), skipped, fmt)[0])

    def numbers(
        column: str, *, reason: str, allow_missing: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values, ok, missing = _numeric(table.column(column))
        problem = ~ok | (~missing & ~np.isfinite(values)) | (missing & (not allow_missing))
        for i in np.flatnonzero(problem):
            raw = table.column(column)[int(i)].as_py()
            what = "empty" if raw in (None, "") else f"{raw!r}, not a finite number"
            bad.append(
                (
                    line(int(i)),
                    reason,
                    f"column {column!r} is {what}",
                )
            )
        values[missing | problem] = 0.0
        return values, problem, missing

    label, label_bad = np.zeros(n), np.zeros(n, bool)  # no label: unlabelled rows (predict)
    if spec.label:
        label, label_bad, _ = numbers(spec.label, reason="bad_label", allow_missing=False)
    if spec.label_threshold is not None:
        label = (label >= spec.label_threshold).astype(np.float64)
    else:
        not01 = ~label_bad & (label != 0) & (label != 1)
        for i in np.flatnonzero(not01):
            row = line(int(i))
            bad.append(
                (
                    row,
                    "bad_label",
                    f"label column {spec.label!r} is {label[i]:g}, not 0 or 1 "
                    "(data.label_threshold makes a click of label >= threshold)",
                )
            )
        label_bad |= not01
    drop = label_bad
    dense = np.zeros((n, len(spec.dense)), np.float32)
    for d, column in enumerate(spec.dense):
        values, problem, missing = numbers(column, reason="bad_dense", allow_missing=True)
        drop = drop | problem
        if spec.dense_transform == DenseTransform.log1p:
            values = np.log1p(np.maximum(values, 0.0))
        # + 0.0 turns a -0.0 value into 0.0: -0.0 marks a missing value (shard_format).
        dense[:, d] = values + 0.0
        dense[missing, d] = -0.0
    ids = [_single(table.column(c)) for c in spec.categorical]
    ids += [_multi(table.column(c), spec.list_separator) for c in spec.multi_hot]
    for column, bounds in spec.buckets.items():
        values, problem, _ = numbers(column, reason="bad_bucket_value", allow_missing=True)
        missing = _missing(table.column(column))
        drop = drop | problem
        rows = np.searchsorted(np.asarray(bounds), values, side="right").astype(np.uint64) + 1
        rows[missing] = 0
        ids.append(FeatureIds(rows, None, ~missing, direct=True))
    bad.sort()
    keep = ~drop
    if not keep.all():
        ids = [_take(f, keep) for f in ids]
    rows = first - 1 + np.flatnonzero(keep)
    return TableBatch(first, label[keep].astype(np.float32), dense[keep], ids, bad, rows)


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return column


def _numeric(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 values, which cells are numbers or missing, which are missing (null, empty)."""
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):  # e.g. a pandas category column
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        stripped = pc.utf8_trim_whitespace(column)
        empty = pc.fill_null(pc.equal(stripped, ""), True)
        number = pc.fill_null(
            pc.match_substring_regex(
                stripped, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^(?i:nan|[-+]?inf(inity)?)$"
            ),
            False,
        )
        cleaned = pc.if_else(pc.and_(number, pc.invert(empty)), stripped, None)
        values = pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False)
        missing = np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)
        ok = np.asarray(pc.or_(number, empty).to_numpy(zero_copy_only=False), dtype=bool)
        return np.array(values, dtype=np.float64), ok, missing
    missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64), np.ones(len(column), dtype=bool), missing


def _missing(column: pa.ChunkedArray) -> np.ndarray:
    text = _as_text(column)
    return np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True), dtype=bool)


def _string_ids(text: pa.Array) -> np.ndarray:
    """FNV-1a of each (non-null) string's UTF-8 bytes."""
    text = pc.cast(pc.fill_null(text, ""), pa.large_string())
    _, offsets, data = text.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[text.offset : text.offset + len(text) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return fnv1a64(data, offsets)


def _single(column: pa.ChunkedArray) -> FeatureIds:
    text = _as_text(column)
    present = ~_missing(column)
    return FeatureIds(_string_ids(text), None, present)


def _multi(column: pa.ChunkedArray, separator: str) -> FeatureIds:
    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lists = column
    else:
        lists = pc.split_pattern(pc.fill_null(_as_text(column), ""), separator)
    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    lengths = np.asarray(pc.list_value_length(lists), dtype=np.int64)
    values = _as_text(pc.list_flatten(lists))
    keep = ~np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True), bool)
    if not keep.all():  # empty items (doubled separators) and nulls are no ids
        owner = np.repeat(np.arange(lengths.size), lengths)
        lengths = np.bincount(owner[keep], minlength=lengths.size).astype(np.int64)
        values = values.filter(pa.array(keep))
    return FeatureIds(_string_ids(values), lengths, None)


def _take(feature: FeatureIds, keep: np.ndarray) -> FeatureIds:
    if feature.lengths is None:
        return FeatureIds(feature.ids[keep], None, feature.present[keep], feature.direct)
    owner = np.repeat(keep, feature.lengths)
    return FeatureIds(feature.ids[owner], feature.lengths[keep], None, feature.direct)
