"""``prepare`` with ``data.partition_by=day|hour``: a table cut into partitions by time.

One call reads ``data.raw`` (Parquet / CSV / TSV, as ``data=table``), puts each
row in the UTC day (or hour) of its ``data.timestamp_column``
(:mod:`trainer.prepare.timestamps`) and appends one partition per period, in
time order, named ``2026-12-01`` (``2026-12-01T13``), to the partitioned
dataset ``data.dir`` through :func:`trainer.prepare.partitions.append_partition`:
the vocabulary extends per partition, the manifest is replaced atomically. A
period's rows keep their order (the files in ``data.raw`` order, each file's
rows in its order). The timestamp column is not a feature.

Under the dataset's lock, every file is read twice by its own task (one per
core): once as the table pipeline reads it (a bad row stops the call before any
partition is written, or is skipped with ``data.on_bad_row=skip``), then a
batch at a time, its new periods' rows written to Parquet files in a scratch
directory (:class:`trainer.prepare.period_files.PeriodFiles`). Each new period is then
prepared from its files like any partition, and the scratch removed.

What the dataset already lists decides what a row may be:

- a period after the newest listed one: new, appended;
- a listed period: its rows must be those it was prepared from (a sha256 of
  its rows' text, column by column): then it is up to date; other rows are
  late rows;
- an unlisted period before the newest listed one: late rows.

Late rows are refused (one line naming the file and line, and the fix) or,
with ``data.on_bad_row=skip``, skipped and counted, as are rows with no
timestamp. The same inputs again are a no-op; a file that grew by a day
appends that day.

Example::

    cfg = TableDataConfig(raw=["events.parquet"], dir="data/days", label="click",
                          categorical=["user"], partition_by="day", timestamp_column="ts")
    result = prepare(cfg)     # trainer.prepare.prepare dispatches here
    result.appended           # ["2026-12-01", "2026-12-02", "2026-12-03"]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.data.data_configs import PartitionBy, TableDataConfig, TableFormat, TimestampUnit
from trainer.data.partitions import PARTITIONS_DIR, Manifest
from trainer.data.shard_format import ShardMetadata
from trainer.data.table_input import _raw_batches, column_names
from trainer.prepare import PREPARE_VERSION, PrepareError, PrepareResult, recorded_settings
from trainer.prepare.common import BadRowLog, merge_bad_rows
from trainer.prepare.parallel import default_workers, report_progress, run_tasks
from trainer.prepare.partitions import append_partition, open_dataset, shared_settings
from trainer.prepare.period_files import PeriodFiles, RowDigest, RowLines
from trainer.prepare.table import TableTask, kept_rows, table_tasks
from trainer.prepare.timestamps import HELP, parse_period_name, period_index, period_name


@dataclass
class CutTask:
    table: TableTask  # the file as the pipeline reads it (its joins, its bad rows)
    source: int  # its place in data.raw
    columns: list[str]  # written to the period files
    timestamp_column: str
    unit: TimestampUnit
    period: PartitionBy
    time_format: str  # data.timestamp_format ("": the column's own type says)
    newest: int | None  # the dataset's newest listed period
    listed: list[int]
    dataset: str
    scratch: str


@dataclass
class PeriodRows:
    """One file's rows of one period."""

    num_rows: int = 0
    digest: str = ""
    files: list[str] = field(default_factory=list)  # new periods: its Parquet files, in order
    first_line: int = 0


@dataclass
class CutOutput:
    periods: dict[int, PeriodRows]
    bad: BadRowLog


def prepare_by_time(cfg: TableDataConfig, *, progress: bool = True) -> PrepareResult:
    """Appends ``cfg.raw``'s new periods to the dataset ``cfg.dir``; see the module docstring."""
    _check_settings(cfg)
    tasks = table_tasks(cfg)
    for task in tasks:
        have = column_names(Path(task.path), task.fmt)
        if cfg.timestamp_column not in have:
            raise PrepareError(
                f"{task.path}: no column {cfg.timestamp_column!r} for data.timestamp_column "
                f"(it has {', '.join(have)}); name the column of each row's time"
            )
    with open_dataset(cfg) as (dataset, manifest):
        listed = _listed_periods(manifest, cfg.partition_by, dataset)
        scratch = dataset / PARTITIONS_DIR / f".cut.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            cut = [
                CutTask(
                    table=task,
                    source=i,
                    columns=_written_columns(task),
                    timestamp_column=cfg.timestamp_column,
                    unit=cfg.timestamp_unit,
                    period=cfg.partition_by,
                    time_format=cfg.timestamp_format,
                    newest=max(listed, default=None),
                    listed=sorted(listed),
                    dataset=str(dataset),
                    scratch=str(scratch),
                )
                for i, task in enumerate(tasks)
            ]
            outputs = run_tasks(
                _cut_file,
                cut,
                num_workers=default_workers(cfg.num_workers),
                total=2 * sum(t.num_rows for t in tasks),
                desc=f"table: cutting by {cfg.partition_by}",
                progress=progress,
            )
            return _append_periods(cfg, dataset, manifest, listed, outputs, progress=progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _check_settings(cfg: TableDataConfig) -> None:
    if cfg.partition:
        raise PrepareError(
            f"data.partition={cfg.partition} with data.partition_by={cfg.partition_by}: the "
            "partitions are named by their period; drop data.partition"
        )
    if not cfg.timestamp_column:
        raise PrepareError(
            f"data.partition_by={cfg.partition_by} needs data.timestamp_column=NAME (the "
            "column holding each row's time)"
        )
    if cfg.timestamp_format and "%" not in cfg.timestamp_format:
        raise PrepareError(
            f"data.timestamp_format={cfg.timestamp_format!r} has no % directive: it is a "
            "strptime format, e.g. %y%m%d%H for 14102100 or '%Y-%m-%d %H:%M' for 2014-10-21 05:00"
        )
    if cfg.eval_raw:
        raise PrepareError(
            f"data.eval_raw with data.partition_by={cfg.partition_by}: each partition's eval "
            "split is its last data.eval_fraction of rows; drop data.eval_raw"
        )
    features = {
        "label": [cfg.label],
        "dense": cfg.dense,
        "categorical": cfg.categorical,
        "multi_hot": cfg.multi_hot,
        "buckets": list(cfg.buckets),
    }
    for key, columns in features.items():
        if cfg.timestamp_column in columns:
            raise PrepareError(
                f"data.timestamp_column={cfg.timestamp_column} is also in data.{key}: the "
                "timestamp cuts the partitions and is not a feature; drop it from "
                f"data.{key} (or bucket a copy of the column)"
            )


def _listed_periods(manifest: Manifest, period: PartitionBy, dataset: Path) -> dict[int, str]:
    """The listed partitions by period: their fingerprints."""
    listed = {}
    for entry in manifest.partitions:
        index = parse_period_name(entry.name, period)
        if index is None:
            raise PrepareError(
                f"{dataset} lists partition {entry.name!r}, not a {period} such as "
                f"{period_name(0, period)}; data.partition_by appends only to datasets it "
                "wrote: prepare into a new data.dir"
            )
        listed[index] = entry.fingerprint
    return listed


def _written_columns(task: TableTask) -> list[str]:
    """The file's own columns the pipeline reads (the joins' keys, not what they add)."""
    have = column_names(Path(task.path), task.fmt)
    keys = [on for _, _, on, _ in task.joins]
    added = {c for _, _, on, cols in task.joins for c in cols if c != on}
    wanted = [c for c in [*task.spec.columns, *keys] if c in have and c not in added]
    return list(dict.fromkeys(wanted))


def _cut_file(task: CutTask) -> CutOutput:
    keep, bad = kept_rows(task.table)
    path, fmt = Path(task.table.path), task.table.fmt
    malformed: list[str] = []
    lines = RowLines(path, fmt, malformed)
    writers = PeriodFiles(Path(task.scratch), task.source)
    digests: dict[int, RowDigest] = {}
    periods: dict[int, PeriodRows] = {}
    listed = set(task.listed)
    ts = task.timestamp_column
    batches = _raw_batches(path, fmt, [*task.columns, ts], task.table.batch_rows, malformed)
    for start, batch in batches:
        rows = start - 1 + np.arange(batch.num_rows)
        good = np.zeros(rows.size, bool)
        inside = rows < keep.size
        good[inside] = keep[rows[inside]]
        try:
            index, ok = period_index(
                batch.column(ts), unit=task.unit, period=task.period, time_format=task.time_format
            )
        except TypeError as err:
            message = f"{path}: column {ts!r} is {err}; fix data.timestamp_column"
            raise PrepareError(message) from None
        no_time = np.flatnonzero(good & ~ok)
        bad.record(
            lines=lines.of(rows[no_time]),
            reasons=["bad_timestamp"] * no_time.size,
            details=[
                f"column {ts!r} is {batch.column(ts)[int(i)].as_py()!r}, not a timestamp "
                f"({HELP}); fix the value"
                for i in no_time
            ],
        )
        good &= ok
        table = pa.Table.from_batches([batch]).drop_columns([ts])
        for k in np.unique(index[good]).tolist():
            at = np.flatnonzero(good & (index == k))
            if task.newest is not None and k <= task.newest and k not in listed:
                newest = period_name(task.newest, task.period)
                bad.record(
                    lines=lines.of(rows[at]),
                    reasons=["late_row"] * at.size,
                    details=[
                        f"column {ts!r} puts the row in {period_name(k, task.period)}, before "
                        f"{newest}, the newest partition of {task.dataset}; partitions are "
                        f"append-only: drop rows before {newest} from data.raw"
                    ]
                    * at.size,
                )
                continue
            part = table.take(pa.array(at))
            digests.setdefault(k, RowDigest()).update(part)
            rows_k = periods.setdefault(k, PeriodRows(first_line=lines.of(rows[at[:1]])[0]))
            rows_k.num_rows += at.size
            if k not in listed:
                writers.write(k, period_name(k, task.period), part)
        report_progress(batch.num_rows)
    files = writers.close()
    for k, rows_k in periods.items():
        rows_k.digest = digests[k].hexdigest()
        rows_k.files = files.get(k, [])
    return CutOutput(periods, bad)


def _append_periods(
    cfg: TableDataConfig,
    dataset: Path,
    manifest: Manifest,
    listed: dict[int, str],
    outputs: list[CutOutput],
    *,
    progress: bool,
) -> PrepareResult:
    """Checks the listed periods' rows, then appends the new periods in time order."""
    logs = [out.bad for out in outputs]
    settings = shared_settings(cfg)
    found = sorted({k for out in outputs for k in out.periods})
    appended: list[str] = []
    result = None
    for k in found:
        name = period_name(k, cfg.partition_by)
        sources = [(raw, out.periods[k]) for raw, out in zip(cfg.raw, outputs) if k in out.periods]
        num_rows = sum(rows.num_rows for _, rows in sources)
        content = hashlib.sha256("\n".join(r.digest for _, r in sources).encode()).hexdigest()
        fingerprint = period_fingerprint(settings, name, content)
        if k in listed:
            if fingerprint != listed[k]:
                logs.append(_other_rows(cfg, dataset, manifest, name, sources))
            continue
        period_cfg = replace(
            cfg,
            raw=[f for _, rows in sources for f in rows.files],
            format=TableFormat.auto,
            partition=name,
        )
        inputs = [
            {
                "period": name,
                "timestamp_column": cfg.timestamp_column,
                "rows": num_rows,
                "content": content,
                "files": [raw for raw, _ in sources],
            }
        ]
        result = append_partition(
            period_cfg,
            dataset,
            manifest,
            inputs=inputs,
            fingerprint=fingerprint,
            progress=progress,
            bad_rows=None if appended else logs,  # the call's skipped rows: with its first
            # The settings as given (the raw files, their format), not the period's scratch.
            settings=recorded_settings(replace(cfg, partition=name)),
        )
        appended.append(name)
    skipped = merge_bad_rows(logs)
    if result is not None:
        return replace(result, appended=appended, skipped=skipped)
    if not manifest.partitions:
        raise PrepareError(
            f"data.raw {list(cfg.raw)}: no rows with a timestamp in "
            f"data.timestamp_column={cfg.timestamp_column} ({skipped['skipped']} bad rows skipped)"
        )
    last = [p for p in manifest.partitions if parse_period_name(p.name, cfg.partition_by) in found]
    target = dataset / (last or manifest.partitions)[-1].path
    return PrepareResult(target, ShardMetadata.read(target), up_to_date=True, skipped=skipped)


def _other_rows(
    cfg: TableDataConfig,
    dataset: Path,
    manifest: Manifest,
    name: str,
    sources: list[tuple[str, PeriodRows]],
) -> BadRowLog:
    """A listed period whose rows here are not those it was prepared from: late rows."""
    entry = manifest.entry(name)
    listed_rows = sum(entry.num_rows.values()) if entry else 0
    raw, first = sources[0]
    num_rows = sum(rows.num_rows for _, rows in sources)
    log = BadRowLog(file=raw, skip=str(cfg.on_bad_row) == "skip")
    log.record(
        lines=[first.first_line],
        reasons=["late_row"],
        details=[
            f"the rows of {name} ({num_rows} in {', '.join(r for r, _ in sources)}) are not "
            f"those of the listed partition {name} of {dataset} ({listed_rows} rows); "
            f"partitions are append-only: drop the rows of {name} and before from data.raw"
        ],
    )
    log.by_reason["late_row"] += num_rows - 1
    return log


def period_fingerprint(settings: dict, name: str, content: str) -> str:
    """A period's: the dataset's settings, its name and its rows (not which files held them)."""
    blob = json.dumps(
        {"version": PREPARE_VERSION, "settings": settings, "partition": name, "content": content},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
