"""Helpers for the ``slurm`` test tier: a real slurmctld on localhost, real sbatch jobs.

Start the cluster with ``scripts/slurm/local-cluster.sh start`` (``.ci/run`` does).
Without ``sbatch`` the tier skips with a reason; with ``CI=true`` it fails instead,
so CI cannot pass by skipping it.

Example::

    require_slurm()
    job = sbatch(["scripts/slurm/train.sbatch", "trainer.num_steps=20"], output=tmp_path / "%j.out")
    info = wait_for(job, timeout_s=120)       # {"JobState": "COMPLETED", "Restarts": "0", ...}
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_HINT = (
    "install and start a local cluster with `scripts/slurm/local-cluster.sh start` "
    "(root; .ci/run does)"
)
# A tiny job: 4 small tables, dim 8, 64 samples per rank and step.
TINY = [
    "trainer.batch_size=64",
    "data.cardinalities=[50,60,70,80]",
    "data.num_eval_samples=512",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "trainer.progress_bar=false",
    "trainer.plot=false",
]


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI=true but {reason}; {START_HINT}", pytrace=False)
    pytest.skip(f"{reason}; {START_HINT}")


def require_slurm() -> None:
    """Skips (fails under CI=true) unless sbatch exists and the local node answers."""
    if shutil.which("sbatch") is None:
        _unavailable("sbatch is not installed")
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except subprocess.TimeoutExpired:
        states = []
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        _unavailable(f"no SLURM node is up (sinfo says {states or 'nothing'})")


def sbatch(args: list[str], *, output: Path, env: dict[str, str] | None = None) -> str:
    """Submits from the repo root (the job's working directory); returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"sbatch {args} failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (kept MinJobAge=300 s after the job ends)."""
    text = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(
    job_id: str, *, timeout_s: float, output: Path | None = None, until: str = "ended"
) -> dict[str, str]:
    """Polls until the job has ended (or ``until="running"``); fails with its output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if until == "running" and state == "RUNNING":
            return info
        if state in ENDED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(
        f"SLURM job {job_id} not {until} after {timeout_s:.0f} s "
        f"({job_info(job_id).get('JobState')}).\n{read_output(output)}",
        pytrace=False,
    )


def read_output(path: Path | None) -> str:
    """A job's output file, for failure messages (sbatch --output=...%j.out)."""
    if path is None or not path.is_file():
        return f"(no output file {path})"
    return f"--- {path} ---\n{path.read_text(errors='replace')[-6000:]}"
