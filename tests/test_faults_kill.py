"""A killed rank: torchrun restarts the group and the run resumes by itself.

Real processes: ``torchrun --standalone --max-restarts=1`` with checkpoints
every 4 steps; rank 1 SIGKILLs itself after step 6 on the first attempt
(``SHARDREC_FAULT_KILL_AT_STEP``, trainer/resilience/fault_injection.py: the injection point is
in the loop, the kill is a real SIGKILL). torchrun tears the group down and
starts it again; the new ranks find ``checkpoints/step_4`` in the same run
directory (``trainer.resume`` defaults to ``auto``) and train steps 5-12.
Compared with the same run uninterrupted: every ``metrics.jsonl`` record
(train losses, AUC, log loss) and the final summary metrics are equal bit for
bit (tolerance 0); steps redone = 2, at most the checkpoint interval. (The
uninterrupted run's ranks are forked by ``fork_trainer``, not started by
torchrun: the same trainer and environment, without importing torch again.)

With 4 ranks this equality needs DDP's gradient buckets laid out once for the
whole run (``sharding.dmp.fix_dense_bucket_layout``): DDP otherwise re-lays them
after a process's first steps, and a ring all-reduce over more than 2 ranks sums
each element in an order set by its place in the bucket, so the 2 steps redone
after the restart rounded differently (eval log loss off by 1e-9).

Measured (2 cores shared with other jobs, load 5-7): from the kill to the resumed
step, 18 s with 2 ranks and 26 s with 4. torchrun sees the dead rank within
0.3 s; the survivors get gloo's "Connection closed by peer" and are gone 0.2-3 s
later; the rest is starting the new processes (imports, build). A survivor that
stays blocked (NCCL does not report a dead peer) exits 5 s after torchrun's
SIGTERM instead of after its 30 s grace (trainer/resilience/preempt.py, test_faults_blocked.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import fork_trainer, free_port
from tests.processes import run
from tests.test_train_e2e import TINY

CHECKPOINT_EVERY = 4
KILL_AT = 6
RUN = [
    *TINY,
    "trainer.num_steps=12",
    "trainer.eval_every_steps=6",
    f"trainer.checkpoint_every_steps={CHECKPOINT_EVERY}",
    "sharding=table_wise",
    # Sync saves: step_4 is complete before the kill whatever the machine's load. An
    # async save still being written when its rank dies is lost (the previous one is
    # used), so there a kill can redo up to the interval plus one save's write time.
    "trainer.async_checkpoint=false",
    "trainer.progress_bar=false",
]


def torchrun(
    *overrides: str,
    run_dir: Path,
    nproc: int,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout_s: int = 400,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone -m trainer`` with overrides and extra environment."""
    launcher = Path(sys.executable).with_name("torchrun")
    return run(
        [
            str(launcher),
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            *extra_args,
            "-m",
            "trainer",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout_s,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _killed_run_resumes(tmp_path: Path, *, nproc: int) -> None:
    reference = tmp_path / "reference"  # ranks forked by fork_trainer: the same trainer
    fork_trainer(*RUN, run_dir=reference, nproc=nproc)

    killed = tmp_path / "killed"
    proc = torchrun(
        *RUN,
        run_dir=killed,
        nproc=nproc,
        env={"SHARDREC_FAULT_KILL_AT_STEP": str(KILL_AT)},
        extra_args=("--max-restarts=1",),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "SIGKILLs itself after step 6" in log and "exitcode: -9" in log
    assert "checkpoints/step_4 at step 4" in log  # resumed by itself, no flag changed
    redone = KILL_AT - CHECKPOINT_EVERY
    print(f"{nproc} ranks: killed after step {KILL_AT}, resumed at 4, steps redone: {redone}")
    assert redone <= CHECKPOINT_EVERY

    steps = [r["step"] for r in records(killed)]
    assert sorted(steps) == steps and len(set(map(str, records(killed)))) == len(steps)
    assert records(killed) == records(reference)  # tolerance 0: bit for bit
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    for key in ("auc", "logloss", "ne", "calibration", "final_train_loss"):
        assert a[key] == b[key], key
    assert b["steps"] == 12


@pytest.mark.dist
def test_a_killed_rank_is_restarted_and_the_run_resumes_by_itself(tmp_path: Path) -> None:
    _killed_run_resumes(tmp_path, nproc=2)


@pytest.mark.slow  # 4 ranks: the 2-rank kill above stays in make test
@pytest.mark.dist
def test_a_killed_rank_of_four_is_restarted_and_resumes(tmp_path: Path) -> None:
    _killed_run_resumes(tmp_path, nproc=4)
