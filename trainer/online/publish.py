"""Published exports: serving bundles written in the background, switched in atomically.

A walk with ``online.publish=true`` publishes the serving bundle at each day's
end (or every ``online.publish_every_steps`` steps) into ``<run_dir>/exports/``,
and a follow job at each partition's end (trainer/online/follow_publish.py)::

    exports/v1/ v2/ v3/      complete bundles (model.pt2, schema.json, sample.pt, ...,
                             and version.json: version, step, the day or the
                             partition and its index, publish time)
    exports/LATEST           one line, the newest version's name: "v3"
    exports/.tmp-v4-<pid>/   the version being written (hidden; never read)

A version is written into a hidden directory inside ``exports/`` (the same
filesystem), every file and the directory fsync'ed, then ``os.replace``'d to
``v<k>/`` in one step; ``LATEST`` is then replaced the same way (a temp file,
fsync, ``os.replace``). A reader that follows ``LATEST`` sees the old version or
the new one, never a part of one. The newest ``online.publish_keep`` versions stay
(never the one ``LATEST`` names); older ones are renamed away, then deleted.
Numbering goes on after a resume from the versions already there.

The walk's thread only gathers what the export needs (trainer/online/snapshot.py:
the collective part, a few copies), then forks: the child process builds the
program, ``torch.export``s it, writes and scores it from its copy-on-write view
of that moment (one intra-op thread, ``nice`` 10, no process group, no CUDA; it
leaves with ``os._exit``), while a parent thread waits for it and does the fsyncs and
renames. A writer still running ``timeout_s`` after its fork
(``online.publish_timeout_s``; one hung in ``torch.export`` once) is killed with
its process group, its hidden directory removed and the version dropped with a
warning: ``LATEST`` keeps the last good version, training goes on, and the next
publish tries again (tests make a writer hang with ``SHARDREC_FAULT_PUBLISH_HANG=k``:
version k's). A job that is stopping (preempted, failed) gives the writer in
flight at most ``online.publish_stop_wait_s`` more (``close(within_s=...)``), so
it exits inside SLURM's grace period whatever the writer does.
A process, not a thread: ``torch.export`` sets process-wide state
(``torch.compiler.is_exporting()``) under which the training thread's DDP
forward raises. One publish in flight at a time: a publish that finds the
previous one still running waits for it, and that wait counts as blocked time.

A server needs no shardrec to follow ``LATEST``: read the text file, load
``exports/<name>/model.pt2`` with ``torch.export.load`` (after ``import
fbgemm_gpu``); :func:`read_latest` does that, trying again when the version it
read was pruned under it.

Example::

    publisher = Publisher(run_dir / "exports", keep=3, timeout_s=600)
    blocked_s = publisher.publish(write, info={"step": 500, "day": 0})  # write(dir) -> dict
    publisher.close()                  # waits for the last one
    publisher.close(within_s=30)       # a stopping job: at most 30 s more
    version, program = read_latest(run_dir / "exports")
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
VERSION_FILE = "version.json"
EXPORTS_DIR = "exports"
_VERSION = re.compile(r"^v(\d+)$")
_HIDDEN = (".tmp-", ".old-", ".LATEST")
STAGE_SUFFIX = ".stage"  # a writer's scratch beside its hidden version (snapshot.py)
_POLL_S = 0.1  # how often the waiting thread looks at the writer
# Tests only: the writer of this version number hangs (after writing) until killed.
HANG_ENV = "SHARDREC_FAULT_PUBLISH_HANG"

Writer = Callable[[Path], dict[str, Any]]


def versions(directory: Path) -> list[int]:
    """The published version numbers in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = (_VERSION.match(p.name) for p in directory.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_name(directory: Path) -> str | None:
    """The version ``LATEST`` names ("v3"), None before the first publish."""
    try:
        return (directory / LATEST_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


class Publisher:
    """Versions in ``directory`` (see the module docstring); ``active``: this process
    writes (rank 0), the others only take part in the snapshot's collectives."""

    def __init__(
        self, directory: Path, *, keep: int, active: bool = True, timeout_s: float = 600.0
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.active = active
        self.timeout_s = timeout_s
        self.cut_at = math.inf  # close(within_s=...): an earlier deadline for the writer
        self.thread: threading.Thread | None = None
        self.done: list[dict[str, Any]] = []  # finished publishes, taken by :meth:`finished`
        self._lock = threading.Lock()
        self.next_version = 1
        if active:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.iterdir():  # a killed run's half-written version
                if stale.name.startswith(_HIDDEN):
                    _remove(stale)
            latest = latest_name(directory)
            named = [int(m.group(1)) for m in [_VERSION.match(latest or "")] if m]
            self.next_version = max([0, *versions(directory), *named]) + 1

    def wait(self) -> float:
        """Waits for the publish in flight (at most until its writer's timeout, when it is
        killed); returns the seconds waited."""
        start = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return time.perf_counter() - start

    def start(self, write: Writer, *, info: dict[str, Any]) -> int:
        """Starts publishing the next version in the background: a forked child runs
        ``write(directory)``, which writes the bundle into the (not yet existing)
        ``directory`` and returns what to report (JSON). Call :meth:`wait` first (one
        in flight). Returns the version number."""
        assert self.active and self.thread is None, "one publish in flight, on the writer"
        version = self.next_version
        self.next_version += 1
        tmp = self.directory / f".tmp-v{version}-{os.getpid()}"
        result_file = tmp.with_name(tmp.name + ".result.json")
        start = time.perf_counter()
        sys.stdout.flush()
        sys.stderr.flush()
        # Nothing alive (or garbage) at the fork is collected in the child: finalising a
        # stale gloo ProcessGroup there waits on threads only the parent has (measured:
        # a writer hung in ProcessGroupGloo's destructor during torch.export).
        gc.freeze()
        try:
            with warnings.catch_warnings():  # Python 3.12: "multi-threaded, fork() may deadlock"
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except BaseException:
            gc.unfreeze()
            raise
        if pid == 0:  # the child: never returns
            _child(write, tmp, result_file, hang=os.environ.get(HANG_ENV) == str(version))
        gc.unfreeze()
        try:  # its own process group (the child sets it too: whichever runs first)
            os.setpgid(pid, pid)
        except OSError:  # it already did, or already exited
            pass
        self.thread = threading.Thread(
            target=self._publish,
            args=(version, pid, tmp, result_file, info, start),
            name=f"publish-v{version}",
        )
        self.thread.start()
        return version

    def publish(self, write: Writer, *, info: dict[str, Any]) -> int:
        """In one process: :meth:`wait`, then :meth:`start`. Returns the version."""
        self.wait()
        return self.start(write, info=info)

    def finished(self) -> list[dict[str, Any]]:
        """The publishes finished since the last call: ``version``, ``publish_s``,
        ``info``, the writer's ``result`` (or ``error``)."""
        with self._lock:
            done, self.done = self.done, []
        return done

    def close(self, *, within_s: float | None = None) -> float:
        """Waits for the last publish; returns the seconds waited. ``within_s``: a
        stopping job's (``online.publish_stop_wait_s``): the writer in flight gets at
        most that long from now, then it is killed as at its timeout (a preempted job
        must exit before SLURM's grace period ends, whatever the writer does)."""
        if within_s is not None:
            self.cut_at = min(self.cut_at, time.perf_counter() + within_s)
        return self.wait()

    def _publish(
        self,
        version: int,
        pid: int,
        tmp: Path,
        result_file: Path,
        info: dict[str, Any],
        start: float,
    ) -> None:
        """The parent's thread: waits for the writer child, then the atomic steps."""
        name = f"v{version}"
        record: dict[str, Any] = {"version": version, "info": info}
        try:
            status = self._reap(pid, deadline=start + self.timeout_s)
            stopped = status is None and self.cut_at < start + self.timeout_s
            if stopped:
                log.warning(
                    "publishing %s: the job is stopping and the writer (pid %d) ran past "
                    "online.publish_stop_wait_s; killed, LATEST stays %s",
                    name,
                    pid,
                    latest_name(self.directory),
                )
                raise TimeoutError(
                    "the job stopped; the writer ran past online.publish_stop_wait_s"
                )
            if status is None:
                log.warning(
                    "publishing %s: the writer (pid %d) ran past online.publish_timeout_s="
                    "%gs and was killed; LATEST stays %s, the next publish tries again",
                    name,
                    pid,
                    self.timeout_s,
                    latest_name(self.directory),
                )
                raise TimeoutError(
                    f"the writer ran past online.publish_timeout_s={self.timeout_s:g}s; killed"
                )
            code = os.waitstatus_to_exitcode(status)
            reported = json.loads(result_file.read_text()) if result_file.exists() else {}
            _remove(result_file)
            if code != 0:
                why = reported.get("error", "see its log")
                raise RuntimeError(f"the writer process exited with {code}: {why}")
            record["result"] = reported["result"]
            stamp = {"version": version, **info, "published_at": time.time()}
            (tmp / VERSION_FILE).write_text(json.dumps(stamp, indent=2))
            _fsync_tree(tmp)
            os.replace(tmp, self.directory / name)
            _fsync_dir(self.directory)
            self._point_latest(name)
            self._prune()
            log.info("published %s (%.2fs)", self.directory / name, time.perf_counter() - start)
        except Exception as err:  # reported in days.jsonl; training goes on
            if not isinstance(err, TimeoutError):
                log.exception("publishing %s failed", name)
            record["error"] = f"{type(err).__name__}: {err}"
            _remove(tmp)
            _remove(tmp.with_name(tmp.name + STAGE_SUFFIX))
            _remove(result_file)
        record["publish_s"] = time.perf_counter() - start
        with self._lock:
            self.done.append(record)

    def _reap(self, pid: int, *, deadline: float) -> int | None:
        """The writer's wait status; None when it ran past ``deadline`` (perf_counter)
        or :attr:`cut_at`, after killing its process group and reaping it."""
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = min(deadline, self.cut_at) - time.perf_counter()
            if left <= 0:
                break
            time.sleep(min(_POLL_S, left))
        try:
            os.killpg(pid, signal.SIGKILL)  # the writer and anything it started
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        return None

    def _point_latest(self, name: str) -> None:
        tmp = self.directory / f".LATEST.tmp-{os.getpid()}"
        with tmp.open("w") as out:
            out.write(name + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / LATEST_FILE)
        _fsync_dir(self.directory)

    def _prune(self) -> None:
        latest = latest_name(self.directory)
        old = [k for k in versions(self.directory) if f"v{k}" != latest]
        for k in old[: max(len(old) - (self.keep - 1), 0)]:
            # Renamed first: no reader finds a half-deleted v<k> by its name.
            gone = self.directory / f".old-v{k}-{os.getpid()}"
            os.replace(self.directory / f"v{k}", gone)
            _remove(gone)


def _child(write: Writer, tmp: Path, result_file: Path, *, hang: bool = False) -> None:
    """The forked writer: ``write(tmp)``, its result into ``result_file``; exits.
    ``hang`` (tests only, :data:`HANG_ENV`): it never finishes, once it has written."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills it and its children
        # One intra-op thread: a forked OpenMP pool must not be entered (as in
        # torch's DataLoader workers); it also leaves the cores to training.
        torch.set_num_threads(1)
        os.nice(10)  # background work: training keeps its cores when they are short
        result = write(tmp)
        while hang:  # a writer stuck before it reports (as one in torch.export once was)
            time.sleep(1)
        result_file.write_text(json.dumps({"result": result}, default=str))
        code = 0
    except BaseException as err:
        traceback.print_exc()
        result_file.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit, no destructors: the parent owns the process group


def read_latest(directory: Path, *, attempts: int = 5) -> tuple[str, nn.Module]:
    """What a server does: the version ``LATEST`` names and its program (loaded with
    ``compression.bundle.load_program``). Raises FileNotFoundError before the first
    publish; tries again when the version was pruned while it loaded."""
    from compression.bundle import PROGRAM_FILE, load_program

    for attempt in range(attempts):
        name = latest_name(directory)
        if name is None:
            raise FileNotFoundError(f"{directory / LATEST_FILE}: nothing published yet")
        try:
            return name, load_program(directory / name / PROGRAM_FILE)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before their directories
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
