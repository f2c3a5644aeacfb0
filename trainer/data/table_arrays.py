"""Arrow columns into the arrays a prepared shard holds: labels, dense values and ids.

:func:`to_arrays` turns one batch of a table's rows (its columns named by a
:class:`TableSpec`, from the ``data=table`` config) into a :class:`TableBatch`: the label
(0/1, or a threshold on a number), the dense columns (``log1p`` where asked; a
missing value as ``-0.0``), each id column's 64-bit FNV-1a hashes of the ids' text
(``5`` and ``"5"`` are one id; multi-hot lists, or text split on a separator) and
the bucket rows of numeric columns; a row with a bad label, dense or bucket value is
dropped and reported with its line. :mod:`trainer.data.table_input` reads the files.

Example::

    batch = to_arrays(path, first, table, spec, TableFormat.csv, skipped=np.zeros(0, np.int64))
    batch.labels, batch.dense, batch.ids[0].ids, batch.bad
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.data_configs import DenseTransform, TableDataConfig, TableFormat
from trainer.data.table_checks import check_types
from trainer.data.table_lines import file_lines
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


def to_arrays(
    path: Path, first: int, table: pa.Table, spec: TableSpec, fmt: TableFormat, skipped: np.ndarray
) -> TableBatch:
    """``table``'s rows (the file's data rows ``first``... less the ``skipped`` lines)
    as arrays, its bad rows reported by line and removed."""
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


def as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
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
    text = as_text(column)
    return np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True), dtype=bool)


def _string_ids(text: pa.Array) -> np.ndarray:
    """FNV-1a of each (non-null) string's UTF-8 bytes."""
    text = pc.cast(pc.fill_null(text, ""), pa.large_string())
    _, offsets, data = text.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[text.offset : text.offset + len(text) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return fnv1a64(data, offsets)


def _single(column: pa.ChunkedArray) -> FeatureIds:
    text = as_text(column)
    present = ~_missing(column)
    return FeatureIds(_string_ids(text), None, present)


def _multi(column: pa.ChunkedArray, separator: str) -> FeatureIds:
    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lists = column
    else:
        lists = pc.split_pattern(pc.fill_null(as_text(column), ""), separator)
    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    lengths = np.asarray(pc.list_value_length(lists), dtype=np.int64)
    values = as_text(pc.list_flatten(lists))
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
