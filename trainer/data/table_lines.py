"""Lines of a text table: the rows pyarrow skipped (the wrong number of fields) and
the file line of a data row once those are skipped.

pyarrow's streaming CSV reader hands a malformed row to a handler without its
line number, so :mod:`trainer.data.table_input` skips it there and, if there
was one, finds every such line here with Python's ``csv`` (a read of the file,
only then), to name the file and line as every other bad row is named.

Example::

    found = malformed_lines(Path("events.csv"), TableFormat.csv)   # [(27, 2, 3)]
    file_lines(np.array([0, 25]), np.array([27]), TableFormat.csv)  # [2, 28]
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainer.data.data_configs import TableFormat


def malformed_lines(path: Path, fmt: TableFormat) -> list[tuple[int, int, int]]:
    """(line, fields, expected fields) of each text row whose field count is not the header's."""
    text_csv = fmt == TableFormat.csv
    found = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(
            f,
            delimiter="," if text_csv else "\t",
            quoting=csv.QUOTE_MINIMAL if text_csv else csv.QUOTE_NONE,
        )
        expected = len(next(reader, []))
        for fields in reader:
            if fields and len(fields) != expected:  # pyarrow skips blank lines
                found.append((reader.line_num, len(fields), expected))
    return found


def malformed_bad(rows: list[tuple[int, int, int]]) -> list[tuple[int, str, str]]:
    """:func:`malformed_lines` as bad rows: (line, reason, detail)."""
    return [
        (line, "wrong_number_of_fields", f"{n} fields, expected {expected} as in the header")
        for line, n, expected in rows
    ]


def file_lines(rows: np.ndarray, skipped: np.ndarray, fmt: TableFormat) -> np.ndarray:
    """File lines of 0-based data rows (a Parquet file's: the 1-based row), past the
    header and the ``skipped`` (sorted) lines of malformed rows."""
    lines = rows + (2 if fmt != TableFormat.parquet else 1)
    for line in skipped:  # in order: each shifts the rows at or after it
        lines = lines + (lines >= line)
    return lines
