"""A lost node, continued on fewer: two torchrun agents as two hosts, one is killed.

``torchrun --nnodes=1:2 --nproc_per_node=1 --rdzv-backend=c10d`` twice on
localhost (agent A hosts the rendezvous). After the run has checkpointed, agent
B and its rank are SIGKILLed. A's rank loses its peer and fails, A's agent
re-forms the group with the one node left, and the new rank plans for a world
of 1, reshards the newest checkpoint onto that plan (``trainer.resume=auto``,
the same run directory: torchrun's run id is the rendezvous id) and trains to
the end.

What a resumed-on-fewer run does with the data: the per-rank batch is kept
(``trainer.batch_size``), so the global batch shrinks with the world (512 ->
256 here) and the steps go on from the checkpoint's; the learning rate is not
rescaled. ``metrics.jsonl`` holds each step once. Elastic runs need a strategy
that keeps every table's kernel kind on every world size (``table_wise``,
``row_wise``): ``auto`` may plan a small table ``data_parallel`` on one world
size and fused on another, which the resume refuses with a ConfigError.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port
from tests.test_faults_kill import records
from tests.test_train_e2e import TINY
from trainer.checkpoint import checkpoint_step, complete_checkpoints

NUM_STEPS = 2000
KILL_AFTER_STEP = 300  # B is killed once a checkpoint of this step or later is complete
RUN = [*TINY, f"trainer.num_steps={NUM_STEPS}", "trainer.eval_every_steps=500"]
RUN += ["trainer.checkpoint_every_steps=20", "trainer.progress_bar=false"]
# A strategy whose tables are fused on every world size: under ``auto`` the planner
# makes small tables data_parallel on 2 ranks and fused on 1, and moving a table
# between the two is refused (their optimizer state differs).
RUN += ["sharding=table_wise"]


def agent(port: int, run_dir: Path, log: Path) -> subprocess.Popen:
    launcher = Path(sys.executable).with_name("torchrun")
    return subprocess.Popen(
        [
            str(launcher),
            "--nnodes=1:2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=elastic-test",
            "--rdzv-conf=last_call_timeout=15,join_timeout=120",
            "--max-restarts=3",
            "--monitor-interval=1",
            "-m",
            "trainer",
            *RUN,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: kill the agent and its rank
    )


def kill_host(agent_proc: subprocess.Popen) -> None:
    """SIGKILL an agent and its ranks (torchrun starts each rank in a session of its own)."""
    ranks = subprocess.run(["pgrep", "-P", str(agent_proc.pid)], capture_output=True, text=True)
    os.killpg(agent_proc.pid, signal.SIGKILL)
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGKILL)


def _newest(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir / "checkpoints")
    return checkpoint_step(found[-1]) or 0 if found else 0


def _wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.dist
@pytest.mark.slow
def test_a_lost_node_continues_on_fewer(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    a = agent(port, run_dir, tmp_path / "a.log")
    time.sleep(1)  # A binds the rendezvous store; B joins within the last call
    b = agent(port, run_dir, tmp_path / "b.log")
    try:
        plan = run_dir / "plan.json"
        _wait_for(lambda: _newest(run_dir) >= KILL_AFTER_STEP, timeout_s=400)
        assert json.loads(plan.read_text())["world_size"] == 2
        kill_host(b)
        assert a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                kill_host(proc)
    log = (tmp_path / "a.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == NUM_STEPS
    assert json.loads(plan.read_text())["world_size"] == 1  # planned again for one rank
    assert "resumed from" in log
    steps = [r["step"] for r in records(run_dir) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == NUM_STEPS
    print(
        "train loss by step:",
        [(r["step"], round(r["train_loss"], 4)) for r in records(run_dir) if "train_loss" in r],
    )
