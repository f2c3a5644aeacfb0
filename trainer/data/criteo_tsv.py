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
        return _empty(BadRows())
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
        return _empty(bad)
    field_starts = np.concatenate([starts[rows, None], field_tabs + 1], axis=1)
    field_ends = np.concatenate([field_tabs, ends[rows, None]], axis=1)
    last_start, last_end = field_starts[:, -1], field_ends[:, -1]
    carriage = (last_end > last_start) & (buf[np.maximum(last_end - 1, 0)] == 13)
    field_ends[:, -1] -= carriage

    ints, int_ok = _decimal(buf, field_starts[:, : 1 + NUM_INT], field_ends[:, : 1 + NUM_INT])
    one_char = field_ends[:, 0] - field_starts[:, 0] == 1
    label_ok = int_ok[:, 0] & one_char & ((ints[:, 0] == 0) | (ints[:, 0] == 1))
    ids, present, hex_ok = _hex(buf, field_starts[:, 1 + NUM_INT :], field_ends[:, 1 + NUM_INT :])
    ok = label_ok & int_ok[:, 1:].all(axis=1) & hex_ok.all(axis=1)
    if not ok.all():
        for j in np.flatnonzero(~ok):
            line = first_line + int(rows[j])
            if not label_ok[j]:
                text = _field_text(buf, field_starts[j, 0], field_ends[j, 0])
                bad.add(line, LABEL, f"label {text} is not 0 or 1")
            elif not int_ok[j, 1:].all():
                k = int(np.flatnonzero(~int_ok[j, 1:])[0])
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
        rows, ints, ids, present = rows[ok], ints[ok], ids[ok], present[ok]
    dense_values = (
        np.log1p(np.maximum(ints[:, 1:], 0).astype(np.float64)).astype(np.float32)
        if dense
        else np.zeros((rows.size, 0), np.float32)
    )
    return CriteoChunk(
        lines=rows.astype(np.int64) + first_line,
        labels=ints[:, 0].astype(np.float32),
        dense=dense_values,
        ids=ids,
        present=present,
        bad=bad,
    )


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


def _empty(bad: BadRows) -> CriteoChunk:
    return CriteoChunk(
        lines=np.zeros(0, np.int64),
        labels=np.zeros(0, np.float32),
        dense=np.zeros((0, NUM_INT), np.float32),
        ids=np.zeros((0, NUM_CAT), np.uint64),
        present=np.zeros((0, NUM_CAT), bool),
        bad=bad,
    )
