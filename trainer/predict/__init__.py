"""Batch scoring of raw rows through a serving bundle (``python -m trainer.predict``).

The rows go through the code ``python -m trainer.prepare`` runs on them (it is
imported, not copied): Criteo TSV lines are cut and parsed by
``trainer.prepare.criteo``'s chunker and ``trainer.data.criteo_tsv.parse_chunk``,
ids mapped by ``trainer.data.vocab.map_ids`` (hash modulus, or the bundle's
copied vocabulary), bad rows handled by ``trainer.prepare.common.BadRowLog``
(one line naming ``file:line``, or counted and skipped with
``on_bad_row=skip``), and the dense columns standardized by the shard reader's
own ``Arrays.to_batch`` with the bundle's float32 mean and 1/std. So a row the
trainer evaluated gets exactly the score the bundle gave it at export.

Memory stays flat: ``chunk_bytes`` of input at a time, scored in batches of
``batch_size``, appended to the Parquet output (``score``, and ``label`` when
the rows have one); the AUC is printed when they do.

A ``data=table`` bundle's rows (Parquet / CSV / TSV, joined to side tables)
go through ``trainer.prepare.table``'s and ``trainer.data.table_input``'s own
reading and mapping instead (:mod:`trainer.predict.table`), described by the
schema's ``table`` entry.

Example::

    python -m trainer.predict outputs/run/bundle 'data.raw=[day_23]' out=scores.parquet
    result = predict(Path("outputs/run/bundle"), raw=["day_23"], out=Path("s.parquet"))
    result["auc"], result["rows"], result["skipped"]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from compression.bundle import load_program, score
from trainer.data.criteo_tsv import CAT_NAMES, parse_chunk
from trainer.data.shard_rows import Arrays
from trainer.data.vocab import Vocabulary, map_ids
from trainer.prepare.common import BadRowLog, PrepareError
from trainer.prepare.criteo import CriteoTask, _chunks
from trainer.report.metrics import binary_auc


class PredictError(ValueError):
    """A bad bundle, input or setting; the message names it and the fix."""


@dataclass
class _Mapping:
    rows: list[int]
    vocabs: list[Vocabulary | None]
    norm: tuple[np.ndarray, np.ndarray] | None


def predict(
    bundle: Path,
    *,
    raw: list[str],
    out: Path,
    on_bad_row: str = "error",
    batch_size: int = 4096,
    chunk_bytes: int = 16 << 20,
    progress: bool = True,
    joins: list[dict[str, Any]] | None = None,
    format: str | None = None,
    batch_rows: int | None = None,
) -> dict[str, Any]:
    """Scores every good row of ``raw`` (Criteo TSV files, or the tables of a
    ``data=table`` bundle) into ``out`` (Parquet).

    Tables only: ``joins`` (``[{raw, on, format}]``; default the schema's, a missing
    ``on`` taken from the schema's join at that index), ``format`` (default the
    schema's) and ``batch_rows`` (rows read at a time). Returns ``{"rows", "skipped",
    "auc" (None without labels), "out"}``; raises :class:`PredictError` naming the
    bundle, file:line or key.
    """
    if on_bad_row not in ("error", "skip"):
        raise PredictError(f"on_bad_row={on_bad_row!r}: use error or skip")
    schema = read_schema(bundle)
    program = load_program(bundle / schema["file"])
    if schema["source"] == "table":
        from trainer.predict.table import predict_table

        return predict_table(
            bundle,
            schema,
            program,
            raw=raw,
            out=out,
            on_bad_row=on_bad_row,
            batch_size=batch_size,
            progress=progress,
            joins=joins,
            fmt=format,
            batch_rows=batch_rows,
        )
    for key, value in (("data.joins", joins), ("data.format", format)):
        if value is not None:
            raise PredictError(f"{key}: a Criteo bundle reads Criteo TSV; {key} is for tables")
    mapping = _mapping(bundle, schema)
    files = [Path(p) for p in raw]
    for path in files:
        if not path.is_file():
            raise PredictError(f"data.raw: {path} not found; pass existing Criteo TSV files")
    keys = [f["name"] for f in schema["features"]]
    sink = ScoreSink(out, labelled=True)
    skipped = 0
    bar = tqdm(
        total=sum(p.stat().st_size for p in files),
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc="predict",
    )
    try:
        for path in files:
            bad = BadRowLog(file=str(path), skip=on_bad_row == "skip")
            task = CriteoTask(
                path=str(path),
                start=0,
                end=path.stat().st_size,
                split="eval",
                chunk_bytes=chunk_bytes,
            )
            line = 1
            for data in _chunks(task):
                chunk = parse_chunk(data, first_line=line)
                try:
                    bad.record(
                        lines=chunk.bad.lines, reasons=chunk.bad.reasons, details=chunk.bad.details
                    )
                except PrepareError as err:
                    raise PredictError(str(err).replace("data.on_bad_row", "on_bad_row")) from err
                line += chunk.num_lines
                bar.update(len(data))
                sink.add(_score_chunk(program, chunk, keys, mapping, batch_size), chunk.labels)
            skipped += bad.num_skipped
    finally:
        bar.close()
        sink.close_writer()
    return sink.result(skipped=skipped)


class ScoreSink:
    """Appends scored rows to the Parquet output (``score``, ``label`` when ``labelled``)
    a chunk at a time and keeps them for the AUC."""

    def __init__(self, out: Path, *, labelled: bool) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.labelled = out, labelled
        self.writer: pq.ParquetWriter | None = None
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, labels: np.ndarray | None) -> None:
        """One chunk's scores (and labels, used when ``labelled``), in row order."""
        columns = {"score": scores.float().numpy()}
        if self.labelled:
            columns["label"] = np.asarray(labels, dtype=np.float32)
            self.labels.append(torch.from_numpy(columns["label"]))
        table = pa.table(columns)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.out, table.schema)
        self.writer.write_table(table)
        self.scores.append(scores.float())

    def close_writer(self) -> None:
        """Closes the output; with no rows at all, an empty file with the columns."""
        if self.writer is not None:
            self.writer.close()
            return
        empty = {"score": pa.array([], pa.float32())}
        if self.labelled:
            empty["label"] = pa.array([], pa.float32())
        pq.write_table(pa.table(empty), self.out)

    def result(self, *, skipped: int) -> dict[str, Any]:
        """``{"rows", "skipped", "auc", "out"}`` (auc None without rows or labels, or with
        one class only: NaN is not JSON)."""
        scores = torch.cat(self.scores) if self.scores else torch.zeros(0)
        auc = None
        if self.labelled and scores.numel():
            auc = binary_auc(scores, torch.cat(self.labels))
            auc = auc if math.isfinite(auc) else None
        return {"rows": int(scores.numel()), "skipped": skipped, "auc": auc, "out": str(self.out)}


def read_schema(bundle: Path) -> dict[str, Any]:
    """The bundle's schema.json; raises PredictError naming the file and the fix."""
    path = bundle / "schema.json"
    if not path.is_file():
        raise PredictError(
            f"{path} not found: BUNDLE must be a directory written by trainer.export=true "
            "or python -m trainer.export (e.g. outputs/run/bundle)"
        )
    schema = json.loads(path.read_text())
    if schema.get("source") not in ("criteo", "table"):
        raise PredictError(
            f"{path}: source {schema.get('source')!r}; trainer.predict reads raw Criteo TSV or "
            "tables, so it serves bundles trained on data=criteo or data=table (score other "
            "sources' rows with the program directly, see compression/bundle.py)"
        )
    if schema["source"] == "table" and not schema.get("table"):
        raise PredictError(
            f"{path} does not describe the raw table: {schema.get('table_error', 'no table')}"
        )
    return schema


def _mapping(bundle: Path, schema: dict[str, Any]) -> _Mapping:
    features = schema["features"]
    if schema["source"] == "criteo" and [f["name"] for f in features] != CAT_NAMES:
        raise PredictError(f"{bundle}/schema.json: features are not Criteo's {CAT_NAMES[:2]}...")
    vocabs: list[Vocabulary | None] = []
    for f in features:
        m = f["mapping"]
        vocabs.append(Vocabulary(np.load(bundle / m["file"])) if m["kind"] == "vocab" else None)
    dense = schema["dense"]
    norm = None
    if dense.get("norm") == "standardize":
        norm = (
            np.asarray(dense["mean_f32"], dtype=np.float32),
            np.asarray(dense["inv_std_f32"], dtype=np.float32),
        )
    return _Mapping(rows=[int(f["rows"]) for f in features], vocabs=vocabs, norm=norm)


def _score_chunk(
    program: torch.nn.Module, chunk: Any, keys: list[str], mapping: _Mapping, batch_size: int
) -> torch.Tensor:
    """The program's probabilities for a parsed chunk's good rows, in row order."""
    ids = [
        map_ids(chunk.ids[:, f], chunk.present[:, f], rows=mapping.rows[f], vocab=mapping.vocabs[f])
        for f in range(len(keys))
    ]
    arrays = Arrays(chunk.labels, chunk.dense, [None] * len(keys), ids)
    return score_arrays(program, arrays, keys, mapping.norm, batch_size)


@torch.no_grad()
def score_arrays(
    program: torch.nn.Module,
    arrays: Arrays,
    keys: list[str],
    norm: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int,
) -> torch.Tensor:
    """The program's probabilities for ``arrays``' rows (mapped ids, stored dense), in
    order, ``batch_size`` at a time through the shard reader's own ``to_batch``."""
    out = []
    num_rows = arrays.labels.shape[0]
    for start in range(0, num_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, num_rows))
        batch = arrays.take(rows).to_batch(keys, dense_norm=norm)
        kjt = batch.sparse_features
        out.append(score(program, batch.dense_features, kjt.values().long(), kjt.lengths().long()))
    return torch.cat(out) if out else torch.zeros(0)
