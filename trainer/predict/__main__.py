"""``python -m trainer.predict BUNDLE 'data.raw=[a.tsv,b.tsv]' out=FILE [on_bad_row=skip]``.

Scores raw Criteo TSV rows, or a ``data=table`` bundle's Parquet / CSV / TSV
tables, through a serving bundle (see :mod:`trainer.predict`); other keys:
``batch_size=4096``, ``chunk_bytes=16777216``, ``progress=false``; tables:
``'data.joins=[{raw: users.parquet, on: user_id}]'`` (default: the schema's side
tables; a join without ``on`` takes the schema's at its index),
``data.format=csv`` and ``data.batch_rows=65536``.
Prints the result as one JSON line (rows, skipped, auc, out); a bad bundle,
file, row or key is one line on stderr, exit 2.

Example::

    python -m trainer.predict outputs/run/bundle 'data.raw=[day_23]' out=scores.parquet
    python -m trainer.predict outputs/ml/bundle 'data.raw=[ml.inter]' out=s.parquet \
        'data.joins=[{raw: ml.user}, {raw: ml.item}]'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from trainer.predict import PredictError, predict

USAGE = "usage: python -m trainer.predict BUNDLE 'data.raw=[FILE,...]' out=FILE [on_bad_row=skip]"
_KEYS = {
    "data.raw",
    "raw",
    "out",
    "on_bad_row",
    "data.on_bad_row",
    "batch_size",
    "chunk_bytes",
    "data.chunk_bytes",
    "progress",
    "data.joins",
    "joins",
    "data.format",
    "format",
    "data.batch_rows",
    "batch_rows",
}


def parse(argv: list[str]) -> tuple[Path, dict]:
    """``(bundle, predict's keyword arguments)``; raises PredictError naming the key."""
    if not argv or "=" in argv[0]:
        raise PredictError(f"the first argument is the bundle directory; {USAGE}")
    args: dict = {}
    for item in argv[1:]:
        key, eq, value = item.partition("=")
        if not eq or key not in _KEYS:
            raise PredictError(f"{item!r}: expected one of {sorted(_KEYS)} as key=value; {USAGE}")
        key = key.removeprefix("data.")
        if key == "raw":
            inner = value.strip()
            inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
            args[key] = [p.strip().strip("'\"") for p in inner.split(",") if p.strip()]
        elif key == "joins":
            try:
                joins = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise PredictError(f"data.joins={value!r}: not a YAML list ({err})") from None
            if not isinstance(joins, list):
                raise PredictError(f"data.joins={value!r}: expected '[{{raw: FILE, on: KEY}}]'")
            # YAML 1.1 reads a bare ``on`` key as True.
            args[key] = [
                {"on" if k is True else str(k): v for k, v in j.items()}
                if isinstance(j, dict)
                else j
                for j in joins
            ]
        elif key in ("batch_size", "chunk_bytes", "batch_rows"):
            try:
                args[key] = int(value)
            except ValueError:
                raise PredictError(f"{key}={value!r} must be an integer") from None
        elif key == "progress":
            args[key] = value.lower() not in ("false", "0", "no")
        elif key == "out":
            args[key] = Path(value)
        else:
            args[key] = value
    for key in ("raw", "out"):
        if not args.get(key):
            raise PredictError(f"{'data.raw' if key == 'raw' else key} is missing; {USAGE}")
    return Path(argv[0]), args


def main(argv: list[str]) -> int:
    try:
        bundle, args = parse(argv)
        result = predict(bundle, **args)
    except (PredictError, FileNotFoundError) as err:
        print(f"shardrec: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
