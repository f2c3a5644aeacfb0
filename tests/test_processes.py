"""tests/processes.py: a command's whole process tree ends within the limit, with stacks."""

from __future__ import annotations

import sys
import time

import pytest

from tests.processes import run, session_members

# A parent and a forked child that keeps the parent's stdout and stderr: what
# subprocess.run(capture_output=True, timeout=...) waits on for ever once it has
# killed the parent (torchrun's ranks, a bundle writer, prepare's workers). The child
# leaves the session, as torchrun's ranks do.
HANG = """
import os, sys, time
print("started", flush=True)
if os.fork() == 0:
    os.setsid()
    def writer_waits():
        time.sleep(1000)
    writer_waits()
def parent_waits():
    time.sleep(1000)
parent_waits()
"""


def test_output_and_exit_code() -> None:
    proc = run([sys.executable, "-c", "import sys; print('out'); sys.exit('err')"], timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "out\n", "err\n")


def test_a_hung_tree_is_ended_at_the_limit_with_every_stack() -> None:
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run([sys.executable, "-c", HANG], timeout=3)
    assert time.monotonic() - start < 20
    message = str(failed.value)
    assert "still ran after 3 s" in message
    assert "in writer_waits" in message and "in parent_waits" in message  # both stacks


def test_what_a_finished_command_left_running_is_ended() -> None:
    script = "import os, time\nif os.fork() == 0:\n    time.sleep(1000)\nprint(os.getpid())"
    proc = run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 0
    assert session_members(int(proc.stdout)) == []  # its orphan is gone too
