"""The vectorised Criteo TSV parser against a pure-Python reference row mapper.

Hypothesis writes arbitrary lines (mostly near-valid ones, since those are
where a vectorised parser goes wrong: signs, widths, empty fields, case,
stray characters, wrong field counts); every line must either parse exactly
as :func:`reference_row` maps it, or be reported as bad with its line number.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.criteo_tsv import (
    COLUMNS,
    HEX,
    INTEGER,
    LABEL,
    NUM_CAT,
    NUM_FIELDS,
    NUM_INT,
    parse_chunk,
)

_INT = re.compile(r"-?[0-9]{1,17}")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")


def reference_row(line: str) -> tuple[float, list[float], list[int], list[bool]] | None:
    """One Criteo line as the documented rules map it; None when it is a bad row."""
    fields = line.removesuffix("\r").split("\t")
    if len(fields) != NUM_FIELDS or fields[0] not in ("0", "1"):
        return None
    dense = []
    for text in fields[1 : 1 + NUM_INT]:
        if text and not _INT.fullmatch(text):
            return None
        value = int(text) if text else 0
        dense.append(float(np.float32(np.log1p(np.float64(max(value, 0))))))
    ids, present = [], []
    for text in fields[1 + NUM_INT :]:
        if text and not _HEX.fullmatch(text):
            return None
        ids.append(int(text, 16) if text else 0)
        present.append(bool(text))
    return float(fields[0]), dense, ids, present


_noise = st.text(alphabet="0123456789abcdefABCDEFxg-+ .\r\u00e9", max_size=19)
_ints = st.one_of(
    st.just(""),
    st.integers(-(10**17) + 1, 10**17 - 1).map(str),
    st.integers(-5, 100).map(str),
    st.text(alphabet="0123456789", min_size=17, max_size=19),
    _noise,
)
_hexes = st.one_of(
    st.just(""),
    st.integers(0, 2**64 - 1).map(lambda v: format(v, "x")),
    st.integers(0, 2**32 - 1).map(lambda v: format(v, "08X")),
    st.text(alphabet="0123456789abcdef", min_size=15, max_size=18),
    _noise,
)


@st.composite
def criteo_line(draw) -> str:
    if draw(st.integers(0, 9)) == 0:  # anything at all, but one line
        return draw(st.text(max_size=60).map(lambda s: s.replace("\n", "")))
    fields = [draw(st.sampled_from(["0", "1", "1", "", "2", "-1", "01"]))]
    fields += [draw(_ints) for _ in range(NUM_INT)]
    fields += [draw(_hexes) for _ in range(NUM_CAT)]
    if draw(st.integers(0, 9)) == 0:
        del fields[draw(st.integers(0, len(fields) - 1))]
    if draw(st.integers(0, 9)) == 0:
        fields.append(draw(_hexes))
    line = "\t".join(fields)
    return line + "\r" if draw(st.integers(0, 19)) == 0 else line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(criteo_line(), min_size=1, max_size=12),
    newline_at_end=st.booleans(),
    first_line=st.integers(1, 10**6),
)
def test_parser_agrees_with_reference(lines: list[str], newline_at_end: bool, first_line: int):
    data = ("\n".join(lines) + ("\n" if newline_at_end else "")).encode()
    chunk = parse_chunk(data, first_line=first_line)
    if not newline_at_end and lines[-1] == "":
        lines = lines[:-1]  # no bytes after the last newline: not a line
    if not lines:
        assert chunk.num_rows == 0 and not chunk.bad.lines
        return
    expected = [reference_row(line) for line in lines]
    good = [i for i, row in enumerate(expected) if row is not None]
    assert chunk.lines.tolist() == [first_line + i for i in good]
    assert chunk.bad.lines == [first_line + i for i, row in enumerate(expected) if row is None]
    for j, i in enumerate(good):
        label, dense, ids, present = expected[i]
        assert chunk.labels[j] == label
        np.testing.assert_allclose(chunk.dense[j], dense, rtol=1e-6)
        assert chunk.ids[j].tolist() == ids
        assert chunk.present[j].tolist() == present


def _line(**override: str) -> str:
    fields = ["1"] + ["3"] * NUM_INT + ["68fd1e64"] * NUM_CAT
    for index, text in override.items():
        fields[int(index.removeprefix("f"))] = text
    return "\t".join(fields)


@pytest.mark.parametrize(
    "line, reason, words",
    [
        ("\t".join(["1"] * 39), COLUMNS, "39 tab-separated fields, expected 40"),
        (_line(f0="x"), LABEL, "label 'x' is not 0 or 1"),
        (_line(f3="1.5"), INTEGER, "integer field 4 (int_2) is '1.5'"),
        (_line(f5="nan"), INTEGER, "integer field 6 (int_4) is 'nan'"),
        (_line(f20="68fd1e6z"), HEX, "categorical field 21 (cat_6) is '68fd1e6z'"),
    ],
)
def test_bad_rows_are_named(line: str, reason: str, words: str):
    data = f"{_line()}\n{line}\n{_line()}\n".encode()
    chunk = parse_chunk(data, first_line=41)
    assert chunk.lines.tolist() == [41, 43]
    assert chunk.bad.lines == [42] and chunk.bad.reasons == [reason]
    assert words in chunk.bad.details[0]


def test_truncated_last_line_is_named():
    data = f"{_line()}\n{_line()[:50]}".encode()
    chunk = parse_chunk(data, first_line=1)
    assert chunk.num_rows == 1 and chunk.bad.lines == [2]
    assert "truncated last line" in chunk.bad.details[0]


def test_values_small_negatives_and_empty_fields():
    line = _line(f1="-2", f2="", f3="0", f4="99", f14="", f15="FFFFFFFFFFFFFFFF", f16="0a")
    chunk = parse_chunk((line + "\r\n").encode(), first_line=1)
    assert chunk.dense[0, :4].tolist() == [0.0, 0.0, 0.0, pytest.approx(np.log(100.0))]
    assert chunk.present[0, :3].tolist() == [False, True, True]
    assert chunk.ids[0, :3].tolist() == [0, 2**64 - 1, 10]
