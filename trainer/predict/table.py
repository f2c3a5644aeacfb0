"""Raw table rows (Parquet / CSV / TSV, joined to side tables) through a ``data=table`` bundle.

The schema's ``table`` entry (trainer/export/bundle.py) rebuilds the
``TableDataConfig`` prepare ran with; the files then go through prepare's own
code, imported: ``trainer.prepare.table``'s tasks (column checks, joins, row
counts), batches (``trainer.data.table_input.read_batches``: pyarrow record
batches of ``batch_rows``, the side tables looked up by key), bad-row log
(``file:line``, or counted with ``on_bad_row=skip``) and id mapping
(``map_features``: hash rows, the bundle's vocabulary, buckets), and the shard
reader's ``to_batch`` with the bundle's float32 mean and 1/std. So an eval row
gets exactly the score the bundle gave it at export.

Rows without the label column are scored too (no ``label`` column, no AUC).

Example::

    predict(Path("outputs/run/bundle"), raw=["events.parquet"], out=Path("s.parquet"),
            joins=[{"raw": "users_v2.parquet"}])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer.data.data_configs import (
    DenseTransform,
    JoinConfig,
    OnBadRow,
    TableDataConfig,
    TableFormat,
)
from trainer.data.shard_rows import Arrays
from trainer.data.table_checks import TableInputError
from trainer.data.table_input import TableSpec, column_names, resolve_format
from trainer.predict import PredictError, ScoreSink, _mapping, score_arrays
from trainer.prepare.common import BadRowLog, PrepareError
from trainer.prepare.table import _batches, _record, _tasks, map_features

__all__ = ["predict_table", "table_config"]


def predict_table(
    bundle: Path,
    schema: dict[str, Any],
    program: torch.nn.Module,
    *,
    raw: list[str],
    out: Path,
    on_bad_row: str,
    batch_size: int,
    progress: bool,
    joins: list[dict[str, Any]] | None = None,
    fmt: str | None = None,
    batch_rows: int | None = None,
) -> dict[str, Any]:
    """Scores every good row of the tables ``raw`` into ``out``; see the module docstring.

    Returns ``{"rows", "skipped", "auc", "out"}``; raises PredictError naming the
    file, file:line, column or key.
    """
    cfg = table_config(
        schema["table"], raw=raw, joins=joins, fmt=fmt, on_bad_row=on_bad_row, batch_rows=batch_rows
    )
    labelled = _labelled(cfg)
    if not labelled:  # score the rows anyway: no label column, no AUC
        cfg.label, cfg.label_threshold = "", None
    spec = TableSpec.from_config(cfg)
    keys = [f["name"] for f in schema["features"]]
    if spec.feature_names != keys:
        raise PredictError(
            f"{bundle}/schema.json: table columns give features {spec.feature_names}, the "
            f"program expects {keys}; export the bundle again"
        )
    mapping = _mapping(bundle, schema)
    sink = ScoreSink(out, labelled=labelled)
    skipped = 0
    bar = None
    try:
        tasks = _tasks(cfg, spec)
        bar = tqdm(
            total=sum(t.num_rows for t in tasks), unit="row", disable=not progress, desc="predict"
        )
        for task in tasks:
            task.skip = cfg.on_bad_row == OnBadRow.skip
            bad = BadRowLog(file=task.path, skip=task.skip)
            for batch in _batches(task):
                _record(bad, batch.bad)
                bar.update(batch.rows.size + len(batch.bad))
                mapped = map_features(batch, mapping.rows, mapping.vocabs)
                arrays = Arrays(
                    batch.labels, batch.dense, [n for n, _ in mapped], [v for _, v in mapped]
                )
                scores = score_arrays(program, arrays, keys, mapping.norm, batch_size)
                sink.add(scores, batch.labels)
            skipped += bad.num_skipped
    except (PrepareError, TableInputError) as err:
        raise PredictError(str(err).replace("data.on_bad_row", "on_bad_row")) from err
    finally:
        if bar is not None:
            bar.close()
        sink.close_writer()
    return sink.result(skipped=skipped)


def table_config(
    table: dict[str, Any],
    *,
    raw: list[str],
    joins: list[dict[str, Any]] | None = None,
    fmt: str | None = None,
    on_bad_row: str = "error",
    batch_rows: int | None = None,
) -> TableDataConfig:
    """The ``TableDataConfig`` prepare read the rows with (schema.json's ``table``), over
    ``raw``; ``joins`` replace the schema's side tables (a missing ``on`` or ``format``:
    the schema's join at that index), ``fmt`` its format."""
    given = table["joins"] if joins is None else joins
    join_cfgs = []
    for i, j in enumerate(given):
        if not isinstance(j, dict) or not j.get("raw"):
            raise PredictError(f"data.joins[{i}]={j!r}: expected {{raw: FILE, on: KEY}}")
        known = table["joins"][i] if i < len(table["joins"]) else {}
        on = j.get("on") or known.get("on")
        if not on:
            raise PredictError(f"data.joins[{i}]: no key; pass {{raw: {j['raw']}, on: COLUMN}}")
        join_fmt = j.get("format") or known.get("format") or "auto"
        join_cfgs.append(JoinConfig(raw=str(j["raw"]), on=str(on), format=_format(join_fmt)))
    return TableDataConfig(
        raw=[str(p) for p in raw],
        format=_format(fmt or table["format"]),
        joins=join_cfgs,
        label=table["label"]["column"],
        label_threshold=table["label"]["threshold"],
        dense=[d["column"] for d in table["dense"]],
        dense_transform=DenseTransform(table["dense"][0]["transform"])
        if table["dense"]
        else DenseTransform.none,
        categorical=list(table["categorical"]),
        multi_hot=list(table["multi_hot"]),
        list_separator=table["list_separator"],
        buckets={k: list(v) for k, v in table["buckets"].items()},
        on_bad_row=OnBadRow(on_bad_row),
        batch_rows=batch_rows or int(table.get("batch_rows", 65536)),
        num_workers=1,
    )


def _format(value: str) -> TableFormat:
    try:
        return TableFormat(value)
    except ValueError:
        raise PredictError(
            f"format={value!r}: use one of {', '.join(f.value for f in TableFormat)}"
        ) from None


def _labelled(cfg: TableDataConfig) -> bool:
    """Whether every input (with its side tables) has the label column."""
    side: set[str] = set()
    try:
        for j in cfg.joins:
            path = Path(j.raw)
            if path.is_file():
                side.update(column_names(path, resolve_format(path, j.format)))
        for p in cfg.raw:
            path = Path(p)
            if not path.is_file():
                raise PredictError(f"data.raw: {path} not found; pass existing table files")
            if cfg.label not in side and cfg.label not in column_names(
                path, resolve_format(path, cfg.format)
            ):
                return False
    except TableInputError as err:
        raise PredictError(str(err)) from err
    return True
