"""What is wrong with a table file, said in one line: the checks of
:mod:`trainer.data.table_input` before and while it reads.

- :func:`compression`: a gzip / xz / zstd / zip file, which no text reader here
  decompresses (a CSV's bytes would otherwise be its "column names");
- :func:`header_hint`: a first line that looks like a data row (MovieLens'
  ``u.data``, ``ratings.dat`` with ``::``), added to a "no column" error;
- :func:`check_types`: a column whose Arrow type cannot fill its role (a list
  named as one id, a struct, a timestamp as the label).

Example::

    kind = compression(path)       # "gzip" or None
    check_types(path, batch_table, spec.roles)   # raises TableInputError naming the fix
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


class TableInputError(ValueError):
    """A table that cannot be read as configured; names the file and column."""


# The first bytes of compressed files, which a text table cannot be read from.
_COMPRESSED = {
    "gzip": b"\x1f\x8b",
    "xz": b"\xfd7zX",
    "zstd": b"\x28\xb5\x2f\xfd",
    "zip": b"PK\x03\x04",
}


def compression(path: Path) -> str | None:
    """``gzip``, ``xz``, ``zstd`` or ``zip`` when the file's first bytes say it is
    compressed (which no text reader here decompresses), else None."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return next((kind for kind, start in _COMPRESSED.items() if magic.startswith(start)), None)


def header_hint(names: list[str], path: Path | None = None, *, tabs: bool = False) -> str:
    """A hint for a "no column" error when the first line looks like a data row, not a
    header (MovieLens' u.data and ratings.dat have none), with a command that writes the
    file (``path``) again under a header line; "" when the line looks like a header.
    ``tabs``: ``names`` were split on tabs (a TSV), not commas."""
    if any("::" in n for n in names):
        count = len(names[0].split("::"))
        example = _with_header(path, count, "\\t", f"sed 's/::/\\t/g' {path}", ".tsv")
        return (
            "; the first line looks like a data row with '::' separators (MovieLens "
            "ratings.dat): write it with tabs (data.format=tsv) under a header line naming "
            f"the columns{example}"
        )
    filled = [n for n in names if n.strip()]

    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if len(filled) >= 2 and sum(map(number, filled)) * 2 > len(filled):
        sep, suffix = ("\\t", ".tsv") if tabs else (",", ".csv")
        example = _with_header(path, len(names), sep, f"cat {path}", suffix)
        return (
            f"; the first line looks like a data row: add a header line naming the columns{example}"
        )
    return ""


def _with_header(path: Path | None, count: int, sep: str, body: str, suffix: str) -> str:
    """The hint's example: a command that writes ``path`` again under a header line,
    ``{ printf 'col1<sep>col2\\n'; <body>; } > <path>.named<suffix>`` ("" without a path)."""
    if path is None:
        return ""
    header = sep.join(f"col{k}" for k in range(1, count + 1))
    return (
        f", e.g. `{{ printf '{header}\\n'; {body}; }} > {path.with_suffix('')}.named{suffix}` "
        "(then use those names, or better ones, in data.*)"
    )


def check_types(path: Path, table: pa.Table, roles: list[tuple[str, str]]) -> None:
    """A column whose Arrow type cannot fill its role (a list named as one id, a struct,
    a timestamp as the label) is one error naming the file, the column and the fix;
    ``roles``: (column, the data.* key naming it), ``TableSpec.roles``."""
    for column, key in roles:
        if not column or column not in table.column_names:
            continue
        kind = table.schema.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if key == "data.multi_hot" and is_list:
            kind, is_list = kind.value_type, False
        if key == "data.categorical" and is_list:
            fix = "name it in data.multi_hot (data.categorical holds one id per row)"
        elif pa.types.is_nested(kind) or is_list:
            fix = f"{key} needs {'numbers' if key in _NUMERIC_ROLES else 'strings or integers'}"
        elif key in _NUMERIC_ROLES and not _numeric_type(kind):
            fix = f"{key} needs numbers (or text holding numbers)"
        else:
            continue
        raise TableInputError(
            f"{path}: column {column!r} is {table.schema.field(column).type}; {fix}"
        )


_NUMERIC_ROLES = ("data.label", "data.dense", "data.buckets")


def _numeric_type(kind: pa.DataType) -> bool:
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_null(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )
