"""Parquet / CSV tables into shards: one task per file, on every core.

The same shards as Criteo's: the label (thresholded), the dense columns, and
one feature per categorical, multi-hot and bucketed column, ids mapped by
hashing or a vocabulary counted over the train rows first. Side tables in
``data.joins`` are read whole by each task (they are the small ones: users,
items) and looked up by key.

Example::

    out = prepare_table(TableDataConfig(raw=["ml-100k.inter"], label="rating",
                                        label_threshold=4, categorical=["user_id"]),
                        work=Path("tmp"), progress=False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from trainer.data.data_configs import Mapping, OnBadRow, TableDataConfig, TableFormat
from trainer.data.table_arrays import TableBatch
from trainer.data.table_checks import TableInputError, header_hint
from trainer.data.table_input import (
    Join,
    TableSpec,
    column_names,
    read_batches,
    read_table,
    resolve_format,
)
from trainer.data.vocab import IdCounter, Vocabulary, map_ids
from trainer.prepare.common import (
    BadRowLog,
    PrepareError,
    TaskOutput,
    check_inputs,
    id_dtype,
    index_tasks,
    per_feature,
)
from trainer.prepare.output import PipelineOutput, vocab_path, write_vocabularies
from trainer.prepare.parallel import default_workers, report_progress, run_tasks
from trainer.prepare.writer import PartWriter


@dataclass
class TableTask:
    path: str
    fmt: TableFormat
    split: str
    spec: TableSpec
    joins: list[tuple[str, TableFormat, str, list[str]]]  # path, format, key, columns
    batch_rows: int
    num_rows: int = 0
    first_index: int = 0
    eval_from: int | None = None
    work: str = ""
    rows: list[int] = field(default_factory=list)
    vocab_dir: str | None = None
    skip: bool = False


def prepare_table(
    cfg: TableDataConfig, *, work: Path, progress: bool, base_vocab: Path | None = None
) -> PipelineOutput:
    """Reads ``cfg.raw`` into parts under ``work``; ``base_vocab``: the previous
    partition's directory, whose vocabularies this one extends."""
    tasks = table_tasks(cfg)
    spec = tasks[0].spec
    names = spec.feature_names
    num_buckets = {f"{c}_bucket": len(b) + 2 for c, b in spec.buckets.items()}
    hashed = [n for n in names if n not in num_buckets]
    rows = dict(zip(hashed, per_feature(list(cfg.table_rows), hashed, "data.table_rows")))
    if cfg.mapping == Mapping.hash and hashed and min(rows.values()) < 2:
        raise PrepareError("data.table_rows: mapping=hash needs at least 2 rows per table")
    num_workers = default_workers(cfg.num_workers)
    index_tasks(
        tasks,
        [t.num_rows for t in tasks],
        eval_fraction=0.0 if cfg.eval_raw else cfg.eval_fraction,
    )
    total = sum(t.num_rows for t in tasks)
    vocab_dir = None
    if cfg.mapping == Mapping.vocab and hashed:
        counts = _run(_count_ids, [t for t in tasks if t.split == "train"], num_workers, progress)
        sizes = write_vocabularies(
            work,
            hashed,
            counts,
            min_count=cfg.min_count,
            max_rows=[rows[n] for n in hashed],
            base=base_vocab,
            fixed_rows=bool(cfg.partition),
        )
        rows = dict(zip(hashed, sizes))
        vocab_dir = str(work)
    table_rows = [num_buckets.get(n) or rows[n] for n in names]
    for i, task in enumerate(tasks):
        task.work = str(work / "ranges" / f"{i:05d}")
        task.rows = table_rows
        task.vocab_dir = vocab_dir
    outputs = _run(_write_file, tasks, num_workers, progress, total=total)
    return PipelineOutput.collect(
        outputs,
        features=names,
        rows=table_rows,
        num_dense=len(spec.dense),
        dense_names=list(spec.dense),
    )


def table_tasks(cfg: TableDataConfig) -> list[TableTask]:
    """One task per file of ``cfg.raw`` / ``eval_raw``, every named column checked."""
    spec = TableSpec.from_config(cfg)
    if not spec.label:
        raise PrepareError("data.label is not set: name the label column (data.label=clicked)")
    if not spec.feature_names:
        raise PrepareError(
            "data=table needs at least one of data.categorical / multi_hot / buckets"
        )
    try:
        tasks = _tasks(cfg, spec)
    except TableInputError as err:
        raise PrepareError(str(err)) from err
    if not tasks:
        raise PrepareError(f"data.raw {list(cfg.raw)}: every file is empty, no rows to prepare")
    for task in tasks:
        task.skip = cfg.on_bad_row == OnBadRow.skip
    return tasks


def kept_rows(task: TableTask) -> tuple[np.ndarray, BadRowLog]:
    """Which of the file's data rows prepare keeps (bool by 0-based data row; a row past
    the array's end: not kept) and its bad rows, raised at once with on_bad_row=error:
    ``data.partition_by``'s first pass, before any row is cut into a partition."""
    bad = BadRowLog(file=task.path, skip=task.skip)
    chunks, end = [], 0
    for batch in _batches(task):
        _record(bad, batch.bad)
        if batch.rows.size:
            stop = int(batch.rows[-1]) + 1
            chunk = np.zeros(stop - end, bool)
            chunk[batch.rows - end] = True
            chunks.append(chunk)
            end = stop
        report_progress(batch.rows.size + len(batch.bad))
    return (np.concatenate(chunks) if chunks else np.zeros(0, bool)), bad


def _run(fn, tasks: list[TableTask], num_workers: int, progress: bool, total: int = 0) -> list:
    try:
        return run_tasks(
            fn,
            tasks,
            num_workers=num_workers,
            total=total or sum(t.num_rows for t in tasks),
            desc=f"table: {'counting ids' if fn is _count_ids else 'writing shards'}",
            progress=progress,
        )
    except TableInputError as err:
        raise PrepareError(str(err)) from err


def _tasks(cfg: TableDataConfig, spec: TableSpec) -> list[TableTask]:
    """One task per input file; checks every named column exists, naming the file."""
    joins = []
    for j, path in zip(cfg.joins, check_inputs([j.raw for j in cfg.joins], "data.joins")):
        fmt = resolve_format(path, j.format)
        have = column_names(path, fmt)
        if j.on not in have:
            raise PrepareError(f"{path}: no column {j.on!r} to join on (it has {', '.join(have)})")
        joins.append((str(path), fmt, j.on, have))
    tasks = []
    for split, files, key in (
        ("train", cfg.raw, "data.raw"),
        ("eval", cfg.eval_raw, "data.eval_raw"),
    ):
        for path in check_inputs(list(files), key):
            fmt = resolve_format(path, cfg.format)
            if fmt != TableFormat.parquet and path.stat().st_size == 0:
                if cfg.on_bad_row == OnBadRow.skip:
                    continue
                raise PrepareError(
                    f"{path} is empty, not even a header line: every file in {key} needs one "
                    "(data.on_bad_row=skip skips empty files)"
                )
            have = column_names(path, fmt)
            used, provided = [], set(have)
            for jpath, jfmt, on, jhave in joins:
                wanted = [c for c in spec.columns if c in jhave and c not in provided]
                if wanted:
                    if on not in have:
                        raise PrepareError(f"{path}: no column {on!r} to join {jpath} on")
                    used.append((jpath, jfmt, on, [on, *wanted]))
                    provided.update(wanted)
            missing = [c for c in spec.columns if c not in provided]
            if missing:
                raise PrepareError(
                    f"{path}: no column {missing[0]!r} (it has {', '.join(have)}"
                    f"{'; joins add ' + ', '.join(sorted(provided - set(have))) if joins else ''})"
                    "; fix data.label / dense / categorical / multi_hot / buckets"
                    + header_hint(have, path, tabs=fmt != TableFormat.csv)
                )
            task = TableTask(str(path), fmt, split, spec, used, cfg.batch_rows)
            task.num_rows = _count_rows(path, fmt, spec.label or have[0], cfg.batch_rows)
            if task.num_rows == 0 and cfg.on_bad_row != OnBadRow.skip:
                raise PrepareError(f"{path} has no rows (data.on_bad_row=skip skips empty files)")
            tasks.append(task)
    return tasks


def _count_rows(path: Path, fmt: TableFormat, label: str, batch_rows: int) -> int:
    if fmt == TableFormat.parquet:
        return pq.ParquetFile(path).metadata.num_rows
    # The rows read_batches hands on: without those with the wrong number of fields.
    return read_table(path, fmt, [label], batch_rows=batch_rows, skip_malformed=True).num_rows


def _batches(task: TableTask):
    joins = [
        Join(read_table(Path(p), fmt, cols, batch_rows=task.batch_rows), on)
        for p, fmt, on, cols in task.joins
    ]
    yield from read_batches(
        Path(task.path), task.spec, fmt=task.fmt, batch_rows=task.batch_rows, joins=joins
    )


def _train_mask(task: TableTask, rows: np.ndarray) -> np.ndarray:
    if task.split == "eval":
        return np.zeros(rows.shape, bool)
    if task.eval_from is None:
        return np.ones(rows.shape, bool)
    return task.first_index + rows < task.eval_from


def _count_ids(task: TableTask) -> list[tuple[np.ndarray, np.ndarray]]:
    names = task.spec.feature_names
    counters = {n: IdCounter() for n in names if not n.endswith("_bucket")}
    bad = BadRowLog(file=task.path, skip=task.skip)
    for batch in _batches(task):
        _record(bad, batch.bad)
        train = _train_mask(task, batch.rows)
        for name, feature in zip(names, batch.ids):
            if name not in counters:
                continue
            if feature.lengths is None:
                counters[name].add(feature.ids[train & feature.present])
            else:
                counters[name].add(feature.ids[np.repeat(train, feature.lengths)])
        report_progress(batch.rows.size + len(batch.bad))
    return [c.totals() for c in counters.values()]


def _record(bad: BadRowLog, rows: list[tuple[int, str, str]]) -> None:
    if rows:
        lines, reasons, details = (list(x) for x in zip(*rows))
        bad.record(lines=lines, reasons=reasons, details=details)


def map_features(
    batch: TableBatch, rows: list[int], vocabs: list[Vocabulary | None]
) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """Per feature of ``batch``: (lengths or None, its ids as int64 table rows): hashed
    into ``rows[f]`` rows or looked up in ``vocabs[f]``; buckets are rows already.
    (Also ``python -m trainer.predict``'s mapping of raw table rows.)"""
    mapped = []
    for f, feature in enumerate(batch.ids):
        present = feature.present if feature.lengths is None else np.ones(feature.ids.size, bool)
        if feature.direct:
            ids = feature.ids.astype(np.int64)
        else:
            ids = map_ids(feature.ids, present, rows=rows[f], vocab=vocabs[f])
        mapped.append((feature.lengths, ids))
    return mapped


def _write_file(task: TableTask) -> TaskOutput:
    names = task.spec.feature_names
    vocabs = [
        Vocabulary(np.load(vocab_path(Path(task.vocab_dir), n)))
        if task.vocab_dir and not n.endswith("_bucket")
        else None
        for n in names
    ]
    dtype = id_dtype(max(task.rows))
    writers: dict[str, PartWriter] = {}
    bad = BadRowLog(file=task.path, skip=task.skip)
    for batch in _batches(task):
        _record(bad, batch.bad)
        mapped = [(n, rows.astype(dtype)) for n, rows in map_features(batch, task.rows, vocabs)]
        train = _train_mask(task, batch.rows)
        for split, mask in (("train", train), ("eval", ~train)):
            if not mask.any():
                continue
            if split not in writers:
                writers[split] = PartWriter(
                    Path(task.work) / split,
                    features=names,
                    num_dense=len(task.spec.dense),
                    id_dtype=dtype,
                )
            ids = []
            for lengths, rows in mapped:
                if lengths is None:
                    ids.append((None, rows[mask]))
                else:
                    ids.append((lengths[mask], rows[np.repeat(mask, lengths)]))
            writers[split].append(batch.labels[mask], batch.dense[mask], ids)
        report_progress(batch.rows.size + len(batch.bad))
    parts = {split: [w.close()] for split, w in writers.items()}
    return TaskOutput(parts=parts, bad=bad, num_lines={task.split: task.num_rows})
