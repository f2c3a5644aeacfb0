"""Criteo TSV files into shards: byte ranges parsed on every core.

Each input file is cut into byte ranges at line ends; a first quick pass counts
the lines of every range (so that each knows its first line number, for error
messages, and where the eval split starts); then each range is parsed chunk by
chunk (``data.chunk_bytes`` at a time: memory does not grow with the file) and
written as one part per split. With ``mapping=vocab`` a counting pass over the
train rows comes before the writing pass.

Example::

    out = prepare_criteo(CriteoDataConfig(raw=["day_0"]), work=Path("tmp"), progress=False)
    out.parts["train"]        # [PartResult, ...] in row order
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.criteo_tsv import CAT_NAMES, DENSE_NAMES, NUM_INT, parse_chunk
from trainer.data.data_configs import CriteoDataConfig, Mapping, OnBadRow
from trainer.data.table_checks import compression
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

_MAX_RANGE_BYTES = 1 << 30
_NUM_RANGES = 16


@dataclass
class CriteoTask:
    path: str
    start: int
    end: int
    split: str  # "train" (raw) or "eval" (eval_raw)
    first_line: int = 1  # file line number of the range's first line
    first_index: int = 0  # index of that line among all lines of the split's files
    num_lines: int = 0
    # Lines with index >= eval_from (of a "train" task) go to the eval split.
    eval_from: int | None = None
    work: str = ""
    rows: tuple[int, ...] = ()
    vocab_dir: str | None = None
    skip: bool = False
    chunk_bytes: int = 16 << 20


def prepare_criteo(
    cfg: CriteoDataConfig, *, work: Path, progress: bool, base_vocab: Path | None = None
) -> PipelineOutput:
    """Parses ``cfg.raw`` (and ``cfg.eval_raw``) into parts under ``work``; ``base_vocab``:
    the previous partition's directory, whose vocabularies this one extends."""
    rows = per_feature(list(cfg.table_rows), CAT_NAMES, "data.table_rows")
    if cfg.mapping == Mapping.hash and min(rows) < 2:
        raise PrepareError("data.table_rows: mapping=hash needs at least 2 rows per table")
    num_workers = default_workers(cfg.num_workers)
    skip = cfg.on_bad_row == OnBadRow.skip
    empty = BadRowLog(file="(inputs)", skip=skip)
    given = {"data.raw": list(cfg.raw), "data.eval_raw": list(cfg.eval_raw)}
    inputs = {key: check_inputs(files, key) for key, files in given.items()}
    for key, paths in inputs.items():
        for path in paths:
            kind = compression(path)
            if kind:  # byte ranges are read in parallel: the text must be plain
                raise PrepareError(
                    f"{key}: {path} is {kind}-compressed (Criteo's day_N.gz are gzip): "
                    f"decompress it first, e.g. gunzip -k {path}, and pass the plain file"
                )
    tasks = _ranges(inputs["data.raw"], "train", cfg, empty)
    tasks += _ranges(inputs["data.eval_raw"], "eval", cfg, empty)
    counted = run_tasks(
        _count_lines, tasks, num_workers=num_workers, total=0, desc="", progress=False
    )
    for task, num_lines in zip(tasks, counted, strict=True):
        task.num_lines = num_lines
    _number_lines(tasks, eval_fraction=0.0 if cfg.eval_raw else cfg.eval_fraction)
    total = sum(t.num_lines for t in tasks)
    if total == 0:
        raise PrepareError(f"data.raw {cfg.raw}: no lines to prepare")
    vocab_dir = None
    if cfg.mapping == Mapping.vocab:
        counts = run_tasks(
            _count_ids,
            [t for t in tasks if t.split == "train"],
            num_workers=num_workers,
            total=sum(t.num_lines for t in tasks if t.split == "train"),
            desc="criteo: counting ids",
            progress=progress,
        )
        rows = write_vocabularies(
            work,
            CAT_NAMES,
            counts,
            min_count=cfg.min_count,
            max_rows=rows,
            base=base_vocab,
            fixed_rows=bool(cfg.partition),
        )
        vocab_dir = str(work)
    for i, task in enumerate(tasks):
        task.work = str(work / "ranges" / f"{i:05d}")
        task.rows = tuple(rows)
        task.vocab_dir = vocab_dir
        task.skip = skip
    outputs = run_tasks(
        _write_range,
        tasks,
        num_workers=num_workers,
        total=total,
        desc="criteo: writing shards",
        progress=progress,
    )
    return PipelineOutput.collect(
        outputs,
        features=CAT_NAMES,
        rows=rows,
        num_dense=NUM_INT,
        dense_names=DENSE_NAMES,
        extra_bad=[empty],
    )


def _ranges(
    paths: list[Path], split: str, cfg: CriteoDataConfig, empty: BadRowLog
) -> list[CriteoTask]:
    """Byte ranges of the files, cut after a newline: about 16 in all, at most 1 GiB each.

    Not a function of the worker count, so that the parts (and the checksum) are
    the same however many processes wrote them."""
    sizes = [p.stat().st_size for p in paths]
    target = sum(sizes) // _NUM_RANGES + 1
    range_bytes = int(min(max(target, cfg.chunk_bytes), _MAX_RANGE_BYTES))
    tasks = []
    for path, size in zip(paths, sizes, strict=True):
        if size == 0:
            if not empty.skip:
                raise PrepareError(
                    f"{path} is empty: every file in data.raw / data.eval_raw needs at least one "
                    "Criteo line (data.on_bad_row=skip skips empty files)"
                )
            empty.by_reason["empty_file"] = empty.by_reason.get("empty_file", 0) + 1
            empty.examples.append(f"{path}: empty file")
            continue
        with open(path, "rb") as f:
            start = 0
            while start < size:
                end = _line_end(f, min(start + range_bytes, size), size)
                tasks.append(CriteoTask(str(path), start, end, split, chunk_bytes=cfg.chunk_bytes))
                start = end
    return tasks


def _line_end(f, pos: int, size: int) -> int:
    """The first offset >= pos just after a newline (or the file's end)."""
    if pos >= size:
        return size
    f.seek(pos - 1)
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        at = block.find(b"\n")
        if at >= 0:
            return f.tell() - len(block) + at + 1


def _number_lines(tasks: list[CriteoTask], *, eval_fraction: float) -> None:
    """First line numbers (per file) and indexes (per split); the eval boundary."""
    line: dict[str, int] = {}
    for task in tasks:
        task.first_line = line.get(task.path, 1)
        line[task.path] = task.first_line + task.num_lines
    index_tasks(tasks, [t.num_lines for t in tasks], eval_fraction=eval_fraction)


def _chunks(task: CriteoTask):
    """Whole lines of the task's range, about ``chunk_bytes`` at a time."""
    with open(task.path, "rb") as f:
        f.seek(task.start)
        pos, carry = task.start, b""
        while pos < task.end:
            data = f.read(min(task.chunk_bytes, task.end - pos))
            if not data:
                break
            pos += len(data)
            data = carry + data if carry else data
            cut = data.rfind(b"\n") + 1 if pos < task.end else len(data)
            carry = data[cut:]
            if cut:
                yield memoryview(data)[:cut]  # no copy
        if carry:
            yield carry


def _count_lines(task: CriteoTask) -> int:
    """Lines in the task's byte range (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(task.path, "rb") as f:
        f.seek(task.start)
        left = task.end - task.start
        while left > 0:
            block = f.read(min(1 << 24, left))
            if not block:
                break
            left -= len(block)
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _count_ids(task: CriteoTask) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per feature, the train ids of the range and their counts."""
    counters = [IdCounter() for _ in CAT_NAMES]
    bad = BadRowLog(file=task.path, skip=task.skip)
    line = task.first_line
    for data in _chunks(task):
        chunk = parse_chunk(data, first_line=line, dense=False)
        bad.record(lines=chunk.bad.lines, reasons=chunk.bad.reasons, details=chunk.bad.details)
        keep = _split_mask(task, chunk.lines)
        for f, counter in enumerate(counters):
            present = chunk.present[:, f] & keep
            counter.add(chunk.ids[present, f])
        line += chunk.num_lines
        report_progress(chunk.num_lines)
    return [c.totals() for c in counters]


def _split_mask(task: CriteoTask, lines: np.ndarray) -> np.ndarray:
    """Which of these rows (by file line number) belong to the train split."""
    if task.split == "eval":
        return np.zeros(lines.shape, bool)
    if task.eval_from is None:
        return np.ones(lines.shape, bool)
    return (lines - task.first_line + task.first_index) < task.eval_from


def _write_range(task: CriteoTask) -> TaskOutput:
    vocabs = (
        [Vocabulary(np.load(vocab_path(Path(task.vocab_dir), f))) for f in CAT_NAMES]
        if task.vocab_dir
        else [None] * len(CAT_NAMES)
    )
    dtype = id_dtype(max(task.rows))
    writers: dict[str, PartWriter] = {}
    bad = BadRowLog(file=task.path, skip=task.skip)
    line = task.first_line
    for data in _chunks(task):
        chunk = parse_chunk(data, first_line=line)
        bad.record(lines=chunk.bad.lines, reasons=chunk.bad.reasons, details=chunk.bad.details)
        mapped = [
            map_ids(chunk.ids[:, f], chunk.present[:, f], rows=task.rows[f], vocab=vocabs[f])
            for f in range(len(CAT_NAMES))
        ]
        train = _split_mask(task, chunk.lines)
        for split, mask in (("train", train), ("eval", ~train)):
            if not mask.any():
                continue
            if split not in writers:
                writers[split] = PartWriter(
                    Path(task.work) / split, features=CAT_NAMES, num_dense=NUM_INT, id_dtype=dtype
                )
            everything = mask.all()
            writers[split].append(
                chunk.labels if everything else chunk.labels[mask],
                chunk.dense if everything else chunk.dense[mask],
                [(None, (m if everything else m[mask]).astype(dtype)) for m in mapped],
            )
        line += chunk.num_lines
        report_progress(chunk.num_lines)
    if line - task.first_line != task.num_lines:
        raise PrepareError(
            f"{task.path} changed while it was prepared ({task.num_lines} lines counted, "
            f"{line - task.first_line} read in bytes {task.start}-{task.end}); run it again"
        )
    parts = {split: [w.close()] for split, w in writers.items()}
    return TaskOutput(parts=parts, bad=bad, num_lines={task.split: task.num_lines})
