"""A timestamp column into periods: UTC days or hours, numbered and named.

``data.partition_by=day|hour`` cuts a table by ``data.timestamp_column``. The
column may hold Arrow timestamps (any unit; with a zone: that instant, without:
UTC), dates, integers or floats (``data.timestamp_unit`` since 1970-01-01 UTC),
or text (a CSV's): such an integer, or ISO 8601 as pyarrow casts it
(``2026-12-01``, ``2026-12-01 13:05:00``, ``2026-12-01T13:05:00Z``,
``...+02:00``; no zone: UTC). Times written another way, as text or digits
(Avazu's hour ``14102100``), are read with ``data.timestamp_format``, a strptime
format (``%y%m%d%H``; no zone: UTC), whatever the column's type. A period is the
number of whole days (hours) since 1970 UTC; its name is ``2026-12-01``
(``2026-12-01T13``), which sorts in time order.

Example::

    periods, ok = period_index(pa.array(["2026-12-01T13:05:00Z", "x"]),
                               unit=TimestampUnit.s, period=PartitionBy.hour)
    period_name(int(periods[0]), PartitionBy.hour)   # "2026-12-01T13"; ok: [True, False]
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.data_configs import PartitionBy, TimestampUnit

US_PER = {"s": 10**6, "ms": 10**3, "us": 1, "ns": 10**-3}  # microseconds per unit
PERIOD_US = {PartitionBy.day: 86_400 * 10**6, PartitionBy.hour: 3_600 * 10**6}
NAME_FORMAT = {PartitionBy.day: "%Y-%m-%d", PartitionBy.hour: "%Y-%m-%dT%H"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The times a period can be named for (datetime's years 1-9999), in microseconds since 1970.
_MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_INTEGER = r"^\s*[-+]?\d+\s*$"
_ZONED = r"(Z|[-+]\d\d:?\d\d)\s*$"
HELP = (
    "a timestamp is an Arrow timestamp or date, an integer (data.timestamp_unit since 1970 UTC) "
    "or ISO 8601 text such as 2026-12-01T13:05:00Z, or text or digits in "
    "data.timestamp_format (e.g. %y%m%d%H for 14102100)"
)


def period_index(
    column: pa.Array | pa.ChunkedArray,
    *,
    unit: TimestampUnit,
    period: PartitionBy,
    time_format: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Per value: its period (int64: whole days or hours since 1970 UTC), and whether
    it is a timestamp at all (null, empty and unparseable values are not, nor times
    outside the years 1-9999: milliseconds read as data.timestamp_unit=s, say)."""
    micros, ok = formatted_us(column, time_format) if time_format else epoch_us(column, unit=unit)
    ok &= (micros >= _MIN_US) & (micros <= _MAX_US)
    return np.floor_divide(np.where(ok, micros, 0), PERIOD_US[period]), ok


def period_name(index: int, period: PartitionBy) -> str:
    return (_EPOCH + timedelta(microseconds=index * PERIOD_US[period])).strftime(
        NAME_FORMAT[period]
    )


def parse_period_name(name: str, period: PartitionBy) -> int | None:
    """The period a partition name stands for; None: not such a name."""
    try:
        when = datetime.strptime(name, NAME_FORMAT[period]).replace(tzinfo=UTC)
    except ValueError:
        return None
    return (when - _EPOCH) // timedelta(microseconds=PERIOD_US[period])


def formatted_us(
    column: pa.Array | pa.ChunkedArray, time_format: str
) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds since 1970 UTC of values written in the strptime ``time_format``
    (integers by their decimal digits; no zone in the format: UTC), and which parse."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return epoch_us(column, unit=TimestampUnit.us)  # already times: no text to parse
    if not (
        pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    ):
        raise TypeError(f"a {kind} column; data.timestamp_format reads text or integers")
    text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    parsed = pc.strptime(text, format=time_format, unit="us", error_is_null=True)
    if parsed.type.tz is not None:  # a %z in the format: that instant
        parsed = pc.cast(parsed, pa.timestamp("us", tz="UTC"))
    return _with_nulls(parsed.cast(pa.int64()))


def epoch_us(
    column: pa.Array | pa.ChunkedArray, *, unit: TimestampUnit
) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds since 1970 UTC (int64, 0 where not ok) and which values are timestamps."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        # A zoned timestamp is stored as UTC; a naive one is read as UTC.
        zone = kind.tz if pa.types.is_timestamp(kind) else None
        micros = pc.cast(column, pa.timestamp("us", tz=zone)).cast(pa.int64())
        return _with_nulls(micros)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        ok = ~np.asarray(column.is_null(), bool) & np.isfinite(values)
        if pa.types.is_integer(kind):  # exact, no float rounding
            whole = pc.fill_null(column, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
            return np.where(ok, _integer_us(whole, unit), 0), ok
        micros = np.where(ok, np.floor(np.where(ok, values, 0) * US_PER[str(unit)]), 0)
        micros = np.clip(micros, _MIN_US - 1, _MAX_US + 1)  # past int64: no wrap-around
        return micros.astype(np.int64), ok
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _text_us(column, unit)
    raise TypeError(f"a {kind} column; {HELP}")


def _text_us(text: pa.Array, unit: TimestampUnit) -> tuple[np.ndarray, np.ndarray]:
    micros = np.zeros(len(text), np.int64)
    ok = np.zeros(len(text), bool)
    text = pc.fill_null(text, "")
    integer = np.asarray(pc.match_substring_regex(text, _INTEGER), bool)
    if integer.any():
        at = np.flatnonzero(integer)
        values = pc.cast(pc.utf8_trim_whitespace(text.take(at)), pa.int64())
        micros[at], ok[at] = _integer_us(values.to_numpy(), unit), True
    zoned = np.asarray(pc.match_substring_regex(text, _ZONED), bool) & ~integer
    for rows, kind in (
        (np.flatnonzero(zoned), pa.timestamp("us", tz="UTC")),
        (np.flatnonzero(~zoned & ~integer), pa.timestamp("us")),
    ):
        if rows.size:
            micros[rows], ok[rows] = _cast_each(pc.utf8_trim_whitespace(text.take(rows)), kind)
    return micros, ok


def _integer_us(values: np.ndarray, unit: TimestampUnit) -> np.ndarray:
    """Microseconds; a value past the years 1-9999 becomes one just past them, never an
    int64 product that wraps around into a plausible time."""
    if str(unit) == "ns":
        return np.floor_divide(values, 1000)
    scale = int(US_PER[str(unit)])
    return np.clip(values, _MIN_US // scale - 1, _MAX_US // scale + 1) * scale


def _cast_each(text: pa.Array, kind: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """pyarrow's cast of the whole array; when a value fails it, value by value (only
    then), to find which."""
    try:
        return _with_nulls(pc.cast(text, kind).cast(pa.int64()))
    except pa.ArrowInvalid:
        pass
    micros, ok = np.zeros(len(text), np.int64), np.zeros(len(text), bool)
    for i in range(len(text)):
        try:
            micros[i], ok[i] = pc.cast(text.slice(i, 1), kind).cast(pa.int64())[0].as_py(), True
        except (pa.ArrowInvalid, TypeError):
            pass
    return micros, ok


def _with_nulls(micros: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.asarray(micros.is_null(), bool)
    return pc.fill_null(micros, 0).to_numpy(zero_copy_only=False).astype(np.int64), ok
