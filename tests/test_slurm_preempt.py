"""trainer/resilience/preempt.py without SLURM: signals set a flag, every rank agrees on it.

The end-to-end path (a real job stopped, requeued and resumed) is in test_slurm.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks
from tests.processes import run
from trainer.resilience.preempt import PREEMPTED_EXIT_CODE, Preempted, Preemption


def test_signal_sets_flag_checked_every_k_steps() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(device=torch.device("cpu"), world_size=1, check_every_steps=5) as p:
        assert not p.should_stop(5)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal is ignored, not fatal
        assert p.requested == signal.SIGUSR1
        assert not p.should_stop(7)  # only every 5th step
        assert p.should_stop(10)
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers put back


def test_preempted_exits_with_75() -> None:
    with pytest.raises(SystemExit) as info:
        raise Preempted(step=3)
    assert info.value.code == PREEMPTED_EXIT_CODE == 75


def _agree(rank: int, store_path: str, results: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    preemption = Preemption(device=torch.device("cpu"), world_size=2, check_every_steps=1)
    with preemption:
        if rank == 1:  # only one rank is signalled
            os.kill(os.getpid(), signal.SIGUSR1)
        decisions = [preemption.should_stop(step) for step in (1, 2)]
    Path(results, f"rank{rank}").write_text(repr(decisions))
    dist.destroy_process_group()


@pytest.mark.dist
def test_every_rank_stops_when_one_is_signalled(tmp_path: Path) -> None:
    run_ranks(_agree, str(tmp_path / "store"), str(tmp_path))
    assert (tmp_path / "rank0").read_text() == "[True, True]"
    assert (tmp_path / "rank1").read_text() == "[True, True]"


def test_a_stop_at_an_interval_end_evaluates_and_checkpoints_first(tmp_path: Path) -> None:
    """A stop that falls on an eval step keeps that eval: a requeued run logs every one.

    Regression (found by tests/test_slurm.py under load): the stop was checked inside
    the interval's last step, before its eval, so a run stopped at step 50 of a
    50-step eval interval resumed at 50 without the step-50 eval. The run is held
    at step 10 (``SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP``) and sent SIGUSR1 there.
    """
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from tests.test_faults_kill import records
    from tests.test_train_e2e import TINY

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", *TINY, "trainer.num_steps=20"]
    cmd += ["trainer.eval_every_steps=10", "trainer.checkpoint_every_steps=10"]
    cmd += ["trainer.progress_bar=false", "trainer.plot=false", f"hydra.run.dir={run_dir}"]
    hold = {"SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP": f"10:{tmp_path / 'never'}"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDREC_FAULT_RANK": "0"}
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **hold}, stdout=out, stderr=out)
        deadline = time.monotonic() + 120
        while "waits at step 10" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    assert "stopped at step 10 (SIGUSR1)" in log.read_text()
    evals = [r["step"] for r in records(run_dir) if "auc" in r]
    assert evals == [10], "the step-10 eval ran before the stop"
    again = run(cmd, cwd=REPO, env=env, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr + again.stdout
    evals = [r["step"] for r in records(run_dir) if "auc" in r]
    assert evals == [10, 20]  # each eval once, none lost
