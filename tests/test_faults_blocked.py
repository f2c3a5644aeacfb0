"""A rank stuck in a collective exits promptly on SIGTERM; a healthy one still stops cleanly.

Real processes: two gloo ranks; rank 0 enters an all-reduce, the parent SIGTERMs
it while it waits there. When rank 1 never joins (a dead peer whose socket is
still open; on NCCL any dead peer looks like this), Python's handler cannot run,
and the preemption watchdog (trainer/resilience/preempt.py) exits the process with 143
``blocked_exit_s`` after the signal, instead of torchrun's SIGKILL after 30 s.
When rank 1 joins a moment later (a healthy group, a peer a little behind),
the handler runs as soon as the all-reduce returns and only sets the flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.processes import run

BLOCKED_EXIT_S = 1.0
RANK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from trainer.resilience.preempt import Preemption

    rank, store_path, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    if rank == 1:
        while not (out / "go").exists():  # late (a healthy peer) or never (a stuck one)
            time.sleep(0.05)
        dist.all_reduce(torch.ones(1))
        sys.exit(0)
    with Preemption(device=torch.device("cpu"), world_size=2, blocked_exit_s={blocked}) as p:
        (out / "blocked").touch()
        dist.all_reduce(torch.ones(1))  # SIGTERMed while waiting here
        (out / "requested").write_text(p.requested.name if p.requested else "none")
    """
).format(blocked=BLOCKED_EXIT_S)


def _rank0_under_sigterm(tmp_path: Path, *, join_after_s: float | None) -> tuple[int, float, str]:
    """SIGTERMs rank 0 inside an all-reduce that rank 1 joins ``join_after_s`` later (None: never).

    Returns rank 0's exit code, the seconds from the signal to its exit, and its stderr.
    """
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "store"), str(tmp_path)],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "blocked").exists():
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            assert time.monotonic() < deadline, "rank 0 never reached the all-reduce"
            time.sleep(0.05)
        time.sleep(0.3)  # inside the all-reduce's wait by now
        start = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        if join_after_s is not None:
            time.sleep(join_after_s)
            (tmp_path / "go").touch()
        code = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - start
        return code, elapsed, procs[0].communicate()[1]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.dist
def test_a_rank_stuck_in_a_collective_exits_on_sigterm(tmp_path: Path) -> None:
    code, elapsed, stderr = _rank0_under_sigterm(tmp_path, join_after_s=None)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM not handled after 1 s" in stderr
    assert BLOCKED_EXIT_S <= elapsed < BLOCKED_EXIT_S + 10, elapsed  # not torchrun's 30 s
    assert not (tmp_path / "requested").exists()


@pytest.mark.dist
def test_a_rank_briefly_waiting_for_a_peer_only_sets_the_flag(tmp_path: Path) -> None:
    # Rank 1 joins 0.3 s after the signal, inside blocked_exit_s (1 s).
    code, _elapsed, stderr = _rank0_under_sigterm(tmp_path, join_after_s=0.3)
    assert code == 0, stderr[-2000:]
    assert (tmp_path / "requested").read_text() == "SIGTERM"


FLOOD = textwrap.dedent(
    """
    import os, signal, time
    import torch
    from trainer.resilience.preempt import Preemption

    with Preemption(device=torch.device("cpu"), world_size=1, blocked_exit_s=0.5):
        for _ in range(300):  # signals back to back: the handler often runs before the
            os.kill(os.getpid(), signal.SIGUSR1)  # watchdog has read the bytes
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.001)
        time.sleep(1.5)
    print("alive")
    """
)


def test_a_responsive_rank_is_never_taken_for_a_stuck_one() -> None:
    """A handler that ran before the watchdog read the signal's byte still counts.

    Regression: the watchdog took "now" before each read as the time a later
    handler run had to beat, so a SIGTERM whose handler ran while the watchdog was
    still busy with the USR1 before it looked unhandled and exited a healthy
    process (it ended `make test` once, 5 s after test_slurm_preempt).
    """
    proc = run([sys.executable, "-c", FLOOD], cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "alive" in proc.stdout, proc.stderr[-2000:]
