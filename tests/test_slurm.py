"""SLURM tier: real jobs on the local cluster (scripts/slurm/local-cluster.sh).

- ``train.sbatch`` in the one-process-per-task form (``srun python -m trainer``,
  2 tasks) trains ``sharding=row_wise`` and writes its plan and summary into
  ``<output dir>/<job id>``: the reference run;
- the same job in the torchrun form (1 node x 2 processes), told to stop mid-run
  (``scancel --signal=USR1 --batch``, what SLURM sends before the time limit),
  checkpoints, requeues itself and finishes with the reference's metrics, training
  no step twice;
- ``python -m trainer -m hydra/launcher=slurm`` sweeps two learning rates.

All of them run side by side (one fixture submits them), to keep the tier short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm_util import (
    ENDED,
    REPO,
    TINY,
    job_info,
    read_output,
    require_slurm,
    sbatch,
    wait_for,
)

pytestmark = pytest.mark.slurm

SBATCH = "scripts/slurm/train.sbatch"
# Long enough to be stopped mid-run: eval and checkpoint every 50 of 150 steps.
PREEMPTIBLE = [
    "sharding=row_wise",
    *TINY,
    "trainer.num_steps=150",
    "trainer.eval_every_steps=50",
    "trainer.checkpoint_every_steps=50",
]
EVAL_KEYS = ("auc", "logloss", "ne", "calibration")


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _wait_for_file(path: Path, text: str, *, job: str, timeout_s: float, output: Path) -> None:
    """Until ``text`` is in ``path``; fails early if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if job_info(job).get("JobState") in ENDED:
            break
        time.sleep(0.2)
    pytest.fail(f"{path} has no {text!r} (job {job})\n{read_output(output)}", pytrace=False)


@dataclass
class Jobs:
    out: Path
    reference: str  # srun form, never stopped
    preempted: str  # torchrun form, stopped once
    sweep: subprocess.CompletedProcess[str]

    def run_dir(self, job: str) -> Path:
        return self.out / job  # named after the job, so a requeue finds it again

    def log(self, job: str) -> str:
        return (self.out / f"{job}.out").read_text()  # --open-mode=append: every start


def _sweep_command(sweep_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "-m",
        "hydra/launcher=slurm",
        "optim.embedding_lr=0.02,0.05",
        *TINY,
        "trainer.num_steps=20",
        "trainer.eval_every_steps=20",
        f"hydra.sweep.dir={sweep_dir}",
    ]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    """Submits the three, stops the preempted one once it trains, waits for all."""
    require_slurm()
    out = tmp_path_factory.mktemp("slurm")
    env = {"SHARDREC_OUTPUT_DIR": str(out)}
    sweep = subprocess.Popen(
        _sweep_command(out / "sweep"),
        cwd=REPO,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reference = sbatch(
        ["--ntasks-per-node=2", SBATCH, *PREEMPTIBLE],
        output=out / "%j.out",
        env={**env, "SHARDREC_LAUNCHER": "srun"},
    )
    preempted = sbatch(
        [SBATCH, *PREEMPTIBLE],
        output=out / "%j.out",
        env={**env, "SHARDREC_NPROC_PER_NODE": "2"},
    )
    try:
        # Stop it once it is training: after its first train-loss record (step 25).
        _wait_for_file(
            out / preempted / "metrics.jsonl",
            "train_loss",
            job=preempted,
            timeout_s=150,
            output=out / f"{preempted}.out",
        )
        subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True, timeout=30)
        for job in (reference, preempted):
            info = wait_for(job, timeout_s=180, output=out / f"{job}.out")
            assert info["JobState"] == "COMPLETED", read_output(out / f"{job}.out")
        stdout, stderr = sweep.communicate(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    return Jobs(
        out=out,
        reference=reference,
        preempted=preempted,
        sweep=subprocess.CompletedProcess(sweep.args, sweep.returncode, stdout, stderr),
    )


def test_srun_one_process_per_task_row_wise(jobs: Jobs) -> None:
    run_dir = jobs.run_dir(jobs.reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["strategy"] == "row_wise"
    assert summary["steps"] == 150
    plan = json.loads((run_dir / "plan.json").read_text())
    assert "row_wise" in json.dumps(plan), plan
    log = jobs.log(jobs.reference)
    assert "2 task(s) on 1 node(s)" in log and "finished (exit 0)" in log, log


def test_torchrun_job_preempted_requeues_and_matches(jobs: Jobs) -> None:
    log = jobs.log(jobs.preempted)
    assert "1 node(s) x 2 process(es)" in log, log
    assert "got SIGUSR1" in log and "requeueing" in log, log
    assert "restart 1]" in log and "finished (exit 0)" in log, log
    assert "stopped at step" in log, log
    stopped_at = int(log.split("stopped at step ")[1].split()[0])
    assert 25 <= stopped_at < 150, f"stopped at step {stopped_at}, not mid-run"
    # The second start went on from the preemption checkpoint, not from scratch.
    assert f"checkpoints/step_{stopped_at} at step {stopped_at}" in log, log
    assert (jobs.run_dir(jobs.preempted) / "plan.json").is_file()

    ref = json.loads((jobs.run_dir(jobs.reference) / "summary.json").read_text())
    got = json.loads((jobs.run_dir(jobs.preempted) / "summary.json").read_text())
    assert got["world_size"] == 2 and got["strategy"] == "row_wise"
    for key in (*EVAL_KEYS, "final_train_loss", "steps"):
        assert got[key] == ref[key], f"{key}: preempted {got[key]}, uninterrupted {ref[key]}"

    records = _records(jobs.run_dir(jobs.preempted))
    ref_records = _records(jobs.run_dir(jobs.reference))
    for kind in ("train_loss", "auc"):
        steps = [r["step"] for r in records if kind in r]
        assert len(steps) == len(set(steps)), f"{kind} logged twice for a step: {steps}"
        assert steps == [r["step"] for r in ref_records if kind in r]
    evals = [r for r in records if "auc" in r]
    assert evals == [r for r in ref_records if "auc" in r]


def test_hydra_submitit_launcher_sweep(jobs: Jobs) -> None:
    sweep_dir = jobs.out / "sweep"
    logs = "\n".join(read_output(p) for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))
    result = jobs.sweep
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{logs}"
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"], f"{result.stderr[-3000:]}\n{logs}"
    for summary, lr in zip(summaries, ("0.02", "0.05")):
        assert json.loads(summary.read_text())["steps"] == 20
        overrides = (summary.parent / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.embedding_lr={lr}" in overrides, overrides
