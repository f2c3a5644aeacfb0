"""Running prepare's tasks on every core, with one progress bar (rows/s, ETA).

Tasks are module-level functions of one picklable argument. Workers report
the lines they have consumed through :func:`report_progress`; the parent polls
that counter into a tqdm bar. The first task error cancels the rest and is
raised in the parent, as it was raised in the worker (a ``PrepareError``
message names the file and line).

Example::

    results = run_tasks(parse_range, tasks, num_workers=2, total=num_lines, desc="criteo")
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_counter: Any = None  # the shared line counter (a multiprocessing.Value) in a worker
_inline_bar: tqdm | None = None


def report_progress(num_lines: int) -> None:
    """Called by a task after each chunk: ``num_lines`` more lines consumed."""
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += num_lines
    elif _inline_bar is not None:
        _inline_bar.update(num_lines)


def _init_worker(counter: Any) -> None:
    global _counter
    _counter = counter


def default_workers(num_workers: int) -> int:
    return num_workers if num_workers > 0 else max(len(os.sched_getaffinity(0)), 1)


def run_tasks(
    fn: Callable[[Any], T],
    tasks: Sequence[Any],
    *,
    num_workers: int,
    total: int,
    desc: str,
    progress: bool = True,
) -> list[T]:
    """``[fn(t) for t in tasks]`` on ``num_workers`` processes (in this one when 1)."""
    global _inline_bar
    bar = tqdm(
        total=total,
        desc=desc,
        unit=" rows",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        if num_workers <= 1 or len(tasks) <= 1:
            _inline_bar = bar
            try:
                return [fn(task) for task in tasks]
            finally:
                _inline_bar = None
        # fork: workers inherit the imported modules (no second torch import per worker).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)
        counter = context.Value("q", 0)
        with ProcessPoolExecutor(
            max_workers=min(num_workers, len(tasks)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(counter,),
        ) as pool:
            futures = [pool.submit(fn, task) for task in tasks]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                bar.update(counter.value - bar.n)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        _stop(pool)
                        raise error
            return [f.result() for f in futures]
    finally:
        bar.close()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancels the queued tasks and ends the running ones (our own workers) now,
    rather than letting them parse the rest of their ranges after an error.

    Never raises: the task's error is what the user must see. The processes are
    listed before ``shutdown``, which sets the pool's ``_processes`` to None."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):  # already gone / closed
            process.terminate()
