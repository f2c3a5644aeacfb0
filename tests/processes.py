"""Running a command line from a test with a limit that holds for its whole tree.

``subprocess.run(..., capture_output=True, timeout=T)`` kills only the process it
started, then reads its pipes to the end, so a grandchild that holds them (torchrun's
ranks, a forked bundle writer, prepare's worker pool) and hangs keeps the test, and the
CI run, waiting for ever. :func:`run` starts the command in a session of its own, with
its output in files, and when the limit passes (or the test is stopped, e.g. by
pytest-timeout) it ends every process of that session: first with SIGABRT, on which
each Python process prints its threads' stacks into the captured stderr
(``PYTHONFAULTHANDLER``), then with SIGKILL; the test fails with that stderr.

Example::

    proc = run([sys.executable, "-m", "trainer", ...], timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

_STACKS_S = 5.0  # how long a process gets to print its stacks
_KILL_S = 5.0  # how long a SIGKILLed process gets to die


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` and their descendants (torchrun starts its
    ranks in sessions of their own), parents first."""
    parent, session = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parent[int(entry.name)], session[int(entry.name)] = int(fields[1]), int(fields[3])
    members = [pid for pid in sorted(parent) if session[pid] == sid]
    found = set(members)
    for pid in members:  # grows while it is walked: breadth first
        for child in sorted(p for p, pp in parent.items() if pp == pid and p not in found):
            found.add(child)
            members.append(child)
    return members


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def end_session(sid: int, *, stacks: bool = True) -> None:
    """Ends every process of session ``sid``: with ``stacks``, SIGABRT to one at a time
    (each prints its stacks whole, not interleaved with the others'), then SIGKILL to
    whatever is left."""
    if stacks:
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + _STACKS_S
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
    killed = session_members(sid)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # SIGKILL is delivered, not done: on a loaded machine a killed process can still
    # be running for a moment, so wait (a little) until each is dead or a zombie.
    deadline = time.monotonic() + _KILL_S
    while not all(_gone(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)


def run(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``args`` to its end (text output captured), within ``timeout`` seconds for the
    whole process tree; the test fails naming the command, with the stacks, if not."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            list(args), cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        ended = False
        try:
            proc.wait(timeout=timeout)
            ended = True
        except subprocess.TimeoutExpired:
            pass
        finally:
            # What it left running goes too; on a timeout or a stopped test, with stacks.
            end_session(proc.pid, stacks=not ended)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if not ended:
        pytest.fail(
            f"{' '.join(map(str, args))[:300]} still ran after {timeout:g} s; its processes "
            f"were ended with their stacks:\n{stderr[-8000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)
