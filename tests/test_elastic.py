"""Elastic runs: a lost node continued on fewer ranks, and a run that grows.

Shrink: two torchrun agents as two hosts, one is killed.

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
rescaled. ``metrics.jsonl`` holds each step once. Elastic runs need every
table's kernel kind kept on every world size (a fused table cannot become
``data_parallel``: the resume refuses it with a ConfigError); ``auto`` never
plans ``data_parallel``, and these tests pin ``table_wise`` so the plans they
reshard between are known.

Grow: agent A (``--nnodes=1:2 --nproc_per_node=2``) starts alone once the
rendezvous' last call has passed and trains on 2 ranks; after a checkpoint,
agent B joins with 2 more. A's agent sees a node waiting, stops its ranks
(SIGTERM: the preemption handler checkpoints the step they agree on) and the
new round forms a world of 4, which plans again, reshards the newest
checkpoint and trains to the end. The per-rank batch is kept, so the global
batch doubles (512 -> 1024). The default tier's version holds A's two ranks after
step 20 (``SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP``) so that a 30-step run is still
training when B joins; the SIGTERM of the membership change ends the hold.

Example (the plot in the README)::

    pytest tests/test_elastic.py -m slow -k grow -s --basetemp=/tmp/grow
    python -m benchmarks.elastic_plot /tmp/grow/test_a_run_grows_when_a_node_j0/run \
        benchmarks/elastic_grow.png --title "2 ranks -> 4 ranks"
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port
from tests.test_faults_kill import records
from tests.test_train_e2e import TINY
from trainer.checkpoint.load import checkpoint_step, complete_checkpoints
from trainer.resilience.fault_injection import FaultInjection

NUM_STEPS = 2000
KILL_AFTER_STEP = 300  # B is killed once a checkpoint of this step or later is complete
RUN = [*TINY, f"trainer.num_steps={NUM_STEPS}", "trainer.eval_every_steps=500"]
RUN += ["trainer.checkpoint_every_steps=20", "trainer.progress_bar=false"]
# Pinned so the plans resharded between are known (every table fused on every world).
RUN += ["sharding=table_wise"]


def agent(
    port: int,
    run_dir: Path,
    log: Path,
    *,
    nproc: int = 1,
    last_call_s: int = 15,
    run: list[str] = RUN,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    launcher = Path(sys.executable).with_name("torchrun")
    return subprocess.Popen(
        [
            str(launcher),
            "--nnodes=1:2",
            f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=elastic-test",
            f"--rdzv-conf=last_call_timeout={last_call_s},join_timeout=120",
            "--max-restarts=3",
            "--monitor-interval=1",
            "-m",
            "trainer",
            *run,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
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


def _listening(port: int) -> bool:
    """Whether some process listens on TCP ``port`` (read from /proc: no connection is made,
    which a TCPStore would count as a client)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def _store_bound(port: int, agent_proc: subprocess.Popen) -> None:
    """Wait until ``agent_proc`` (the first agent) listens on the rendezvous port, so it
    hosts the store. A fixed sleep raced a loaded machine: the second agent bound the
    store first, and killing it took the store from the survivor."""
    _wait_for(lambda: _listening(port) or agent_proc.poll() is not None, timeout_s=120)
    assert agent_proc.poll() is None, "the first agent exited before binding its store"


@pytest.mark.dist
@pytest.mark.slow
def test_a_lost_node_continues_on_fewer(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    a = agent(port, run_dir, tmp_path / "a.log")
    _store_bound(port, a)  # A hosts the rendezvous store; B joins within the last call
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


# The default tier's shrink: few steps; B's rank kills its agent and itself after step
# FAST_KILL_AT (trainer/resilience/fault_injection.py), so the kill lands mid-run
# whatever the machine's speed.
FAST_STEPS = 30
FAST_KILL_AT = 15


def _fast_run(num_steps: int, eval_every: int) -> list[str]:
    """A tiny table-wise run that checkpoints every 10 steps, synchronously."""
    return [
        *TINY,
        f"trainer.num_steps={num_steps}",
        f"trainer.eval_every_steps={eval_every}",
        "trainer.checkpoint_every_steps=10",
        "trainer.progress_bar=false",
        "sharding=table_wise",
        "trainer.async_checkpoint=false",
    ]


FAST_RUN = _fast_run(FAST_STEPS, eval_every=10)


@pytest.mark.dist
def test_a_lost_host_continues_on_fewer_fast(tmp_path: Path) -> None:
    """The shrink above in the default tier: killed after step 15, resumed on 1 rank at 10."""
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # last call: B's agent must join A's first round within it; A's re-formed round
    # (B gone) also waits for it.
    a = agent(port, run_dir, logs[0], last_call_s=8, run=FAST_RUN)
    _store_bound(port, a)  # A hosts the rendezvous store
    kill = {"SHARDREC_FAULT_KILL_HOST_AT_STEP": str(FAST_KILL_AT), "SHARDREC_FAULT_RANK": "any"}
    b = agent(port, run_dir, logs[1], last_call_s=8, run=FAST_RUN, env=kill)
    try:
        assert a.wait(timeout=300) == 0, logs[0].read_text()[-3000:]
        assert b.wait(timeout=60) == -signal.SIGKILL, logs[1].read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                kill_host(proc)
    log = "".join(path.read_text() for path in logs)
    assert "SIGKILLs its agent and itself" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == FAST_STEPS
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 1
    assert re.search(r"resumed from \S*step_10 at step 10", log), log[-3000:]
    steps = [r["step"] for r in records(run_dir) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == FAST_STEPS


GROW_STEPS = 600
JOIN_AFTER_STEP = 200  # B joins once a checkpoint of this step or later is complete
GROW_RUN = [*TINY, f"trainer.num_steps={GROW_STEPS}", "trainer.eval_every_steps=200"]
GROW_RUN += ["trainer.checkpoint_every_steps=20", "trainer.progress_bar=false"]
GROW_RUN += ["sharding=table_wise"]
# torch 2.13's c10d rendezvous shares its TCPStore with the workers by default, and
# an agent that stays rank 0 across rounds keeps the store info of its first round:
# it never publishes MASTER_ADDR for the round a joining node is in, so the joiner
# waits for it and rank 0 waits for the joiner's role info (both time out after 60 s).
# Not sharing the store makes every round publish it (rank 0's worker then hosts
# the process group's store on a free port).
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.dist
@pytest.mark.slow
def test_a_run_grows_when_a_node_joins(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # A alone: min 1 node, so the round completes 3 s after A joins, with world 2.
    a = agent(port, run_dir, logs[0], nproc=2, last_call_s=3, run=GROW_RUN, env=NO_SHARED_STORE)
    b = None
    try:
        plan = run_dir / "plan.json"
        _wait_for(lambda: _newest(run_dir) >= JOIN_AFTER_STEP, timeout_s=400)
        assert json.loads(plan.read_text())["world_size"] == 2
        b = agent(port, run_dir, logs[1], nproc=2, last_call_s=3, run=GROW_RUN, env=NO_SHARED_STORE)
        assert a.wait(timeout=600) == 0, logs[0].read_text()[-3000:]
        assert b.wait(timeout=120) == 0, logs[1].read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                kill_host(proc)
    log = "".join(path.read_text() for path in logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == GROW_STEPS
    assert summary["global_batch_size"] == 2 * 2 * 256  # per-rank batch kept
    assert json.loads(plan.read_text())["world_size"] == 4  # planned again for four ranks
    resumed = re.findall(r"resumed from \S*step_(\d+) at step (\d+)", log)
    assert resumed, log[-3000:]
    resumed_at = int(resumed[-1][1])
    assert resumed_at >= JOIN_AFTER_STEP
    # torchrun stops A's ranks with SIGTERM when B waits to join: the preemption handler
    # checkpoints the step they agree on, and that checkpoint is the one resumed
    stopped = re.findall(r"stopped at step (\d+) \(SIGTERM\); checkpoint \S*step_(\d+)", log)
    if stopped:
        assert resumed_at == int(stopped[-1][0]) == int(stopped[-1][1])
    train = [(r["step"], r["train_loss"]) for r in records(run_dir) if "train_loss" in r]
    steps = [step for step, _ in train]
    # each step once: nothing after the resumed checkpoint was kept from the 2-rank attempt
    assert steps == sorted(set(steps)) and steps[-1] == GROW_STEPS
    assert any(step <= resumed_at for step in steps) and any(step > resumed_at for step in steps)
    print("resumed at step", resumed_at, "loss by step:", [(s, round(v, 4)) for s, v in train])


# The default tier's grow: a tiny run would end before B joins, so A's ranks hold after
# step FAST_HOLD_AT (SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP, trainer/resilience/
# fault_injection.py) until the
# membership change SIGTERMs them; the hold is at a multiple of the preemption's
# agreement interval (10), so they stop, checkpoint and resume at that very step.
FAST_GROW_STEPS = 30
FAST_HOLD_AT = 20
FAST_GROW_RUN = _fast_run(FAST_GROW_STEPS, eval_every=30)


@pytest.mark.dist
def test_a_run_grows_when_a_node_joins_fast(tmp_path: Path) -> None:
    """The grow above in the default tier: 2 ranks held at step 20, B joins, 4 ranks finish."""
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    hold = {
        "SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP": f"{FAST_HOLD_AT}:{tmp_path / 'never'}",
        "SHARDREC_FAULT_RANK": "any",
    }
    a = agent(
        port, run_dir, logs[0], nproc=2, last_call_s=2, run=FAST_GROW_RUN,
        env={**NO_SHARED_STORE, **hold},
    )  # fmt: skip
    b = None
    try:
        held = f"waits at step {FAST_HOLD_AT}"
        _wait_for(lambda: held in logs[0].read_text() or a.poll() is not None, timeout_s=180)
        assert a.poll() is None, logs[0].read_text()[-3000:]
        assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2
        assert _newest(run_dir) == FAST_HOLD_AT - 10  # the scheduled one before the hold
        b = agent(
            port, run_dir, logs[1], nproc=2, last_call_s=2, run=FAST_GROW_RUN, env=NO_SHARED_STORE
        )
        assert a.wait(timeout=240) == 0, logs[0].read_text()[-3000:]
        assert b.wait(timeout=60) == 0, logs[1].read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                kill_host(proc)
    log = "".join(path.read_text() for path in logs)
    assert "goes on after step 20 (a stop signal)" in log, log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == FAST_GROW_STEPS
    assert summary["global_batch_size"] == 4 * 256  # per-rank batch kept (trainer=smoke)
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 4  # planned again
    # the stopped ranks checkpointed the held step, and that checkpoint is the one resumed
    stopped = re.findall(r"stopped at step (\d+) \(SIGTERM\); checkpoint \S*step_(\d+)", log)
    assert stopped == [(str(FAST_HOLD_AT), str(FAST_HOLD_AT))], log[-3000:]
    assert re.search(rf"resumed from \S*step_{FAST_HOLD_AT} at step {FAST_HOLD_AT}", log)
    steps = [r["step"] for r in records(run_dir) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == FAST_GROW_STEPS
    assert FAST_HOLD_AT in steps  # logged by the 2-rank attempt, kept once


def test_the_hold_ends_on_its_file_or_a_stop_signal(tmp_path: Path, monkeypatch) -> None:
    """The hold the fast grow relies on, in-process: file, signal, first attempt only."""
    monkeypatch.setenv("SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP", f"2:{tmp_path / 'go'}")
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "any")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FaultInjection.from_env(rank=0).wait_for_file is None  # a restart does not hold
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    seen: list[int] = []
    previous_term = signal.getsignal(signal.SIGTERM)  # the hold chains onto both
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: seen.append(signum))
    try:
        # released by its file
        faults = FaultInjection.from_env(rank=3)
        threading.Timer(0.3, (tmp_path / "go").touch).start()
        start = time.monotonic()
        faults.after_step(1)
        faults.after_step(2)
        assert (tmp_path / "go").exists() and 0.25 < time.monotonic() - start < 10
        # released by a stop signal; the handler that was there still runs
        (tmp_path / "go").unlink()
        faults = FaultInjection.from_env(rank=3)
        faults.after_step(1)  # chains onto SIGUSR1's handler
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        backstop = threading.Timer(10, (tmp_path / "go").touch)  # a failure, not a hang
        backstop.start()
        faults.after_step(2)
        backstop.cancel()
        assert seen == [signal.SIGUSR1] and not (tmp_path / "go").exists()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGUSR1, previous)
    monkeypatch.setenv("SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP", "twenty")
    with pytest.raises(ValueError, match="SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP='twenty'"):
        FaultInjection.from_env(rank=0)
