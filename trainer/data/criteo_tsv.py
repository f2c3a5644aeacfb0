"""Criteo TSV rows into arrays, vectorised over a chunk of raw bytes.

The Criteo Kaggle ``train.txt`` and 1TB ``day_N`` layout: one sample per line,
40 tab-separated fields -- the label (0 or 1), 13 integer counts, 26
categorical ids as hexadecimal strings -- and any field except the label may be
empty. :func:`parse_chunk` turns a block of whole lines into numpy arrays
without a Python loop over rows: it finds the tabs and newlines, gathers each
field right-aligned into a fixed-width byte matrix and decodes all fields of a
column at once.

What a line maps to (the reference the property tests check against):

- label: ``"0"`` or ``"1"`` exactly, as float32;
- integer field: empty (0) or ``-?[0-9]{1,17}``; the dense value is
  ``float32(log(1 + max(x, 0)))``;
- categorical field: empty (no id) or 1 to 16 hex digits (either case), the id
  being that number (uint64); ``present`` says which were non-empty;
- a trailing ``\\r`` (Windows line ends) is dropped; nothing else is trimmed.

Any other line is a bad row; it is reported with its line number and reason
(:class:`BadRows`), never silently mapped.

Example::

    chunk = parse_chunk(b"1\\t5\\t...\\t68fd1e64\\n", first_line=1)
    chunk.labels, chunk.dense, chunk.ids, chunk.present, chunk.bad.lines
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NUM_INT = 13
NUM_CAT = 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
DENSE_NAMES = [f"int_{i}" for i in range(NUM_INT)]
CAT_NAMES = [f"cat_{i}" for i in range(NUM_CAT)]
# Longest integer field: a sign and 17 digits always fit int64.
MAX_INT_CHARS = 18
MAX_HEX_CHARS = 16

# Bad-row reasons (keys of the metadata's bad-row counts).
COLUMNS = "wrong_number_of_fields"
LABEL = "bad_label"
INTEGER = "non_numeric_integer"
HEX = "non_hex_categorical"

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _c in b"0123456789":
    _HEX_LUT[_c] = _c - 48
for _i, _c in enumerate(b"abcdef"):
    _HEX_LUT[_c] = 10 + _i
    _HEX_LUT[_c - 32] = 10 + _i
_LEAD = max(MAX_INT_CHARS, MAX_HEX_CHARS)


@dataclass
class BadRows:
    """Lines of a chunk that are not Criteo rows: 1-based line numbers, reasons, details."""

    lines: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def add(self, line: int, reason: str, detail: str) -> None:
        self.lines.append(line)
        self.reasons.append(reason)
        self.details.append(detail)

    def sort(self) -> None:
        """Orders by line number (field-count errors are found before the others)."""
        order = sorted(range(len(self.lines)), key=self.lines.__getitem__)
        self.lines = [self.lines[i] for i in order]
        self.reasons = [self.reasons[i] for i in order]
        self.details = [self.details[i] for i in order]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason in self.reasons:
            out[reason] = out.get(reason, 0) + 1
        return out


@dataclass
class CriteoChunk:
    """The good rows of a chunk, in line order (``lines``: their 1-based line numbers)."""

    lines: np.ndarray  # int64 [n]
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13]
    ids: np.ndarray  # uint64 [n, 26]; 0 where absent
    present: np.ndarray  # bool [n, 26]
    bad: BadRows
    # Lines in the chunk, good and bad.
    num_lines: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])


def parse_chunk(data: bytes | memoryview, *, first_line: int, dense: bool = True) -> CriteoChunk:
    """Parses whole lines (``data`` ends with a newline, except at the end of a file).

    ``first_line`` is the 1-based line number of ``data``'s first line;
    ``dense=False`` skips the dense columns (a vocabulary count needs ids only).
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size == 0:
        return _empty(BadRows(), 0)
    # Filler before the first byte so that fixed-width windows never start before it;
    # positions below are in this buffer.
    buf = np.concatenate([np.zeros(_LEAD, np.uint8), raw])
    newlines = np.flatnonzero(buf == 10)
    ends = newlines if buf[-1] == 10 else np.append(newlines, buf.size)
    starts = np.empty_like(ends)
    starts[0] = _LEAD
    starts[1:] = ends[:-1] + 1
    tabs = np.flatnonzero(buf == 9)
    tabs_before_end = np.searchsorted(tabs, ends)
    tab_counts = np.diff(tabs_before_end, prepend=0)
    good = tab_counts == NUM_FIELDS - 1
    bad = BadRows()
    if not good.all():
        for i in np.flatnonzero(~good):
            truncated = " (a truncated last line: the file does not end with a newline)"
            note = truncated if i == ends.size - 1 and buf[-1] != 10 else ""
            bad.add(
                first_line + int(i),
                COLUMNS,
                f"{tab_counts[i] + 1} tab-separated fields, expected {NUM_FIELDS} (label, "
                f"{NUM_INT} integers, {NUM_CAT} hex ids){note}",
            )
        field_tabs = tabs[np.repeat(good, tab_counts)].reshape(-1, NUM_FIELDS - 1)
    else:
        field_tabs = tabs.reshape(-1, NUM_FIELDS - 1)
    rows = np.flatnonzero(good)
    if rows.size == 0:
        return _empty(bad, int(ends.size))
    field_starts = np.concatenate([starts[rows, None], field_tabs + 1], axis=1)
    field_ends = np.concatenate([field_tabs, ends[rows, None]], axis=1)
    last_start, last_end = field_starts[:, -1], field_ends[:, -1]
    carriage = (last_end > last_start) & (buf[np.maximum(last_end - 1, 0)] == 13)
    field_ends[:, -1] -= carriage

    label_char = buf[field_starts[:, 0]]
    one_char = field_ends[:, 0] - field_starts[:, 0] == 1
    label_ok = one_char & ((label_char == 48) | (label_char == 49))
    ints, int_ok = _decimal_fast(
        buf, field_starts[:, 1 : 1 + NUM_INT], field_ends[:, 1 : 1 + NUM_INT]
    )
    ids, present, hex_ok = _hex_fast(
        buf, field_starts[:, 1 + NUM_INT :], field_ends[:, 1 + NUM_INT :]
    )
    ok = label_ok & int_ok.all(axis=1) & hex_ok.all(axis=1)
    blank = field_starts[:, 1 : 1 + NUM_INT] == field_ends[:, 1 : 1 + NUM_INT]
    if not ok.all():
        for j in np.flatnonzero(~ok):
            line = first_line + int(rows[j])
            if not label_ok[j]:
                text = _field_text(buf, field_starts[j, 0], field_ends[j, 0])
                bad.add(line, LABEL, f"label {text} is not 0 or 1")
            elif not int_ok[j].all():
                k = int(np.flatnonzero(~int_ok[j])[0])
                text = _field_text(buf, field_starts[j, 1 + k], field_ends[j, 1 + k])
                bad.add(
                    line,
                    INTEGER,
                    f"integer field {k + 2} ({DENSE_NAMES[k]}) is {text}, not an integer "
                    f"(-?[0-9]{{1,{MAX_INT_CHARS - 1}}}) or empty",
                )
            else:
                k = int(np.flatnonzero(~hex_ok[j])[0])
                text = _field_text(
                    buf, field_starts[j, 1 + NUM_INT + k], field_ends[j, 1 + NUM_INT + k]
                )
                bad.add(
                    line,
                    HEX,
                    f"categorical field {k + 2 + NUM_INT} ({CAT_NAMES[k]}) is {text}, not "
                    f"1-{MAX_HEX_CHARS} hex digits or empty",
                )
        bad.sort()
        rows, ints, ids, present, blank = rows[ok], ints[ok], ids[ok], present[ok], blank[ok]
        label_char = label_char[ok]
    dense_values = (
        np.log1p(np.maximum(ints, 0).astype(np.float64)).astype(np.float32)
        if dense
        else np.zeros((rows.size, 0), np.float32)
    )
    if dense:
        # An empty field is 0 like a count of 0, but -0.0: equal to 0 in any arithmetic
        # (the raw log1p values of MLPerf), yet marked missing for standardization.
        dense_values[blank] = -0.0
    return CriteoChunk(
        lines=rows.astype(np.int64) + first_line,
        labels=(label_char == 49).astype(np.float32),
        dense=dense_values,
        ids=ids,
        present=present,
        bad=bad,
        num_lines=int(ends.size),
    )


# Masks of the low k bytes of a uint64 (k = 0..8), and of the high k bytes.
_LOW = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)
_HIGH = np.array([((1 << 64) - 1) ^ ((1 << (8 * (8 - k))) - 1) for k in range(9)], dtype=np.uint64)
_ZEROS = np.uint64(0x3030303030303030)
_U = np.uint64


def _words(buf: np.ndarray, order: str) -> np.ndarray:
    """Every 8 consecutive bytes of ``buf`` as one uint64 (``order`` "<" or ">"):
    ``words[i]`` is ``buf[i:i + 8]``, so a gather reads a field in one load."""
    return np.ndarray((buf.size - 7,), dtype=np.dtype(order + "u8"), buffer=buf, strides=(1,))


def _decimal_fast(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_decimal` for fields of up to 8 characters (SWAR: 8 digits in a word,
    combined in three multiplies); longer fields go the general way."""
    lengths = ends - starts
    # Little-endian: the field's first character is the lowest of its bytes, which
    # are the top `length` bytes of the word; the bytes before it become '0'.
    x = _words(buf, "<")[ends - 8].astype(np.uint64)
    high = _HIGH[np.clip(lengths, 0, 8)]
    x = (x & high) | (_ZEROS & ~high)
    sign_shift = (8 * (8 - np.clip(lengths, 1, 8))).astype(np.uint64)
    negative = (lengths >= 2) & (lengths <= 8) & (((x >> sign_shift) & _U(0xFF)) == _U(45))
    x = np.where(negative, x + (_U(3) << sign_shift), x)  # '-' (45) becomes '0' (48)
    f0 = _U(0xF0F0F0F0F0F0F0F0)
    ok = ((x & f0) == _ZEROS) & (((x + _U(0x0606060606060606)) & f0) == _ZEROS)
    x &= _U(0x0F0F0F0F0F0F0F0F)
    x = ((x * _U(10)) + (x >> _U(8))) & _U(0x00FF00FF00FF00FF)
    x = ((x * _U(100)) + (x >> _U(16))) & _U(0x0000FFFF0000FFFF)
    x = ((x * _U(10000)) + (x >> _U(32))) & _U(0xFFFFFFFF)
    values = x.astype(np.int64)
    np.negative(values, out=values, where=negative)
    ok &= lengths <= 8
    empty = lengths == 0
    np.putmask(values, empty, 0)
    ok |= empty
    longer = lengths > 8
    if longer.any():
        values[longer], ok[longer] = _decimal(buf, starts[longer], ends[longer])
    np.putmask(values, ~ok, 0)
    return values, ok


def _hex_fast(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_hex` for fields of up to 8 characters (SWAR: a word of characters to
    nibbles, packed in three shifts); longer fields go the general way."""
    lengths = ends - starts
    # Big-endian: the field is the low `length` bytes; the bytes before it become '0'.
    x = _words(buf, ">")[ends - 8].astype(np.uint64)
    low = _LOW[np.clip(lengths, 0, 8)]
    x = (x & low) | (_ZEROS & ~low)
    ok = _all_bytes_hex(x)
    # '0'-'9' -> c & 15; 'a'-'f' and 'A'-'F' (bit 6 set) -> (c & 15) + 9.
    x = (x & _U(0x0F0F0F0F0F0F0F0F)) + _U(9) * ((x >> _U(6)) & _U(0x0101010101010101))
    x = (x | (x >> _U(4))) & _U(0x00FF00FF00FF00FF)
    x = (x | (x >> _U(8))) & _U(0x0000FFFF0000FFFF)
    x = (x | (x >> _U(16))) & _U(0xFFFFFFFF)
    present = lengths > 0
    ok &= lengths <= 8
    longer = lengths > 8
    if longer.any():
        x[longer], _, ok[longer] = _hex(buf, starts[longer], ends[longer])
    ok |= ~present
    np.putmask(x, ~(ok & present), _U(0))
    return x, present, ok


def _rep(byte: int) -> np.uint64:
    return np.uint64(byte * 0x0101010101010101)


def _bytes_in(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per byte of 7-bit ``x``: 0x80 where ``lo <= byte <= hi`` (no carries between bytes)."""
    return (x + _rep(0x80 - lo)) & ~(x + _rep(0x7F - hi)) & _rep(0x80)


def _all_bytes_hex(x: np.ndarray) -> np.ndarray:
    """Whether each of the 8 bytes of every word is a hex digit (0-9, a-f, A-F)."""
    ascii7 = x & _rep(0x7F)
    hits = _bytes_in(ascii7, 0x30, 0x39) | _bytes_in(ascii7 | _rep(0x20), 0x61, 0x66)
    return (hits == _rep(0x80)) & ((x & _rep(0x80)) == _U(0))


def _right_aligned(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int, pad: int
) -> np.ndarray:
    """Fields ``buf[starts:ends]`` as a ``[..., width]`` byte matrix, right-aligned.

    ``buf`` starts with ``_LEAD`` filler bytes (so that a window never starts
    before it); one gather per field, of ``width`` contiguous bytes.
    """
    windows = np.lib.stride_tricks.sliding_window_view(buf, width)
    out = windows[ends - width]
    before_start = np.arange(width) < (width - (ends - starts))[..., None]
    np.putmask(out, before_start, pad)
    return out


def _decimal(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signed decimal fields (empty is 0): values int64 and which were well formed."""
    lengths = ends - starts
    width = int(min(max(int(lengths.max()), 1), MAX_INT_CHARS))
    fits = lengths <= width
    chars = _right_aligned(buf, starts, np.minimum(ends, starts + width), width, 48)
    first_at = np.clip(width - lengths, 0, width - 1)
    first = np.take_along_axis(chars, first_at[..., None], -1)[..., 0]
    negative = (lengths >= 2) & fits & (first == 45)
    is_sign = (np.arange(width) == (width - lengths)[..., None]) & negative[..., None]
    np.putmask(chars, is_sign, 48)
    digits = chars - np.uint8(48)  # wraps: anything but 0-9 becomes > 9
    ok = fits & (digits <= 9).all(axis=-1)
    ok &= ~((lengths == MAX_INT_CHARS) & ~negative)  # 18 digits could overflow
    values = np.zeros(lengths.shape, dtype=np.int64)
    for k in range(width):
        values *= 10
        values += digits[..., k]
    values[~ok] = 0
    return np.where(negative, -values, values), ok


def _hex(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex fields: ids uint64 (0 where empty), present, well formed (empty counts as such)."""
    lengths = ends - starts
    width = int(min(max(int(lengths.max()), 1), MAX_HEX_CHARS))
    width += width % 2
    chars = _right_aligned(buf, starts, np.minimum(ends, starts + width), width, 48)
    nibbles = _HEX_LUT[chars]
    ok = (nibbles != 255).all(axis=-1) & (lengths <= MAX_HEX_CHARS)
    packed = np.zeros(chars.shape[:-1] + (8,), dtype=np.uint8)
    packed[..., 8 - width // 2 :] = (nibbles[..., 0::2] << 4) | (nibbles[..., 1::2] & 15)
    ids = packed.view(">u8")[..., 0].astype(np.uint64)
    present = lengths > 0
    ids[~(ok & present)] = 0
    return ids, present, ok


def _field_text(buf: np.ndarray, start: int, end: int) -> str:
    text = bytes(buf[start:end]).decode("utf-8", errors="replace")
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _empty(bad: BadRows, num_lines: int) -> CriteoChunk:
    return CriteoChunk(
        lines=np.zeros(0, np.int64),
        labels=np.zeros(0, np.float32),
        dense=np.zeros((0, NUM_INT), np.float32),
        ids=np.zeros((0, NUM_CAT), np.uint64),
        present=np.zeros((0, NUM_CAT), bool),
        bad=bad,
        num_lines=num_lines,
    )
