"""Sweeps as config (conf/sweep/) and the sweep report (``python -m trainer.report``).

Every sweep file composes into jobs that validate; a real local multirun with a
failing job is reported with the failure's error line beside the finished
jobs, and each finished job's offline wandb run is grouped by the sweep and
named by its overrides.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF_DIR, REPO
from tests.processes import run
from tests.test_logger_plots import read_wandb_run
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs, to_config
from trainer.config.validate import validate
from trainer.report import sweep as sweep_report

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


def _compose(overrides: list[str], *, hydra: bool = False):  # noqa: ANN202
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def test_the_common_studies_exist() -> None:
    assert {"lr_batch", "precision_qat"} <= set(SWEEPS)


def _jobs(params: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the swept values, but the seed axis only once: a seed
    meets no cross-field check, so each other seed is composed with one combination
    (int2_study: 8 composes of ~1.5 s each rather than 18)."""
    seeds = params.get("trainer.seed", [None])
    rest = {k: v for k, v in params.items() if k != "trainer.seed"}
    jobs = [dict(zip(rest, values)) for values in itertools.product(*rest.values())]
    if seeds[0] is None:
        return jobs
    first = jobs[0]
    return [{**job, "trainer.seed": seeds[0]} for job in jobs] + [
        {**first, "trainer.seed": seed} for seed in seeds[1:]
    ]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_job_of_every_sweep_composes_and_validates(sweep: str) -> None:
    cfg = _compose([f"+sweep={sweep}"], hydra=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params and all(len(v) > 1 for v in params.values()), params
    assert f"multirun/{sweep}/" in cfg.hydra.sweep.dir  # the report's and wandb's group name
    for job in _jobs(params):
        job_cfg = _compose([f"+sweep={sweep}", *(f"{k}={v}" for k, v in job.items())])
        typed = to_config(job_cfg)
        validate(typed, world_size=1)
        for key, value in job.items():
            if key != "experiment":  # a file of overrides, not one key
                node = job_cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value, (key, node, value)


def test_a_sweep_goes_to_slurm_with_the_launcher() -> None:
    if not (CONF_DIR / "hydra" / "launcher" / "slurm.yaml").exists():
        pytest.skip("conf/hydra/launcher/slurm.yaml is not in this checkout")
    cfg = _compose(["+sweep=lr_batch", "hydra/launcher=slurm"], hydra=True)
    assert "submitit" in cfg.hydra.launcher._target_
    assert cfg.hydra.sweeper.params["trainer.batch_size"] == "512,2048"
    # submitit's logs land where the report looks for a failed job's stderr.
    assert cfg.hydra.launcher.submitit_folder.startswith(cfg.hydra.sweep.dir + "/.submitit/")


def _write_job(
    sweep: Path, num: int, overrides: list[str], *, summary: dict | None = None, log: str = ""
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if log:
        (job / "__main__.log").write_text(log)
    return job


def test_error_lines_from_the_job_log_and_from_slurm(tmp_path: Path) -> None:
    ok = {"auc": 0.7, "samples_per_sec": 1000.0, "embedding_bytes": 4096}
    _write_job(tmp_path, 0, ["optim.embedding_lr=0.02", "trainer=smoke"], summary=ok)
    traceback = (
        "[2026-11-29 18:00:00,000][trainer][INFO] - sharding plan (auto):\n"
        "[2026-11-29 18:00:01,000][trainer][ERROR] - job failed\n"
        "Traceback (most recent call last):\n"
        '  File "trainer/loop/trainer.py", line 1, in fit\n'
        "RuntimeError: CUDA out of memory\n"
    )
    _write_job(tmp_path, 1, ["optim.embedding_lr=0.1", "trainer=smoke"], log=traceback)
    _write_job(tmp_path, 2, ["optim.embedding_lr=0.5", "trainer=smoke"])
    _write_job(tmp_path, 10, ["optim.embedding_lr=0.9", "trainer=smoke"])
    # hydra-submitit-launcher: <sweep>/.submitit/<array job id>_<job num>/*_log.err
    slurm = tmp_path / ".submitit" / "77_2"
    slurm.mkdir(parents=True)
    (slurm / "77_2_0_log.err").write_text(
        "starting\n"
        "slurmstepd: error: *** JOB 77 ON n1 CANCELLED AT 2026-11-29 DUE TO TIME LIMIT ***\n"
    )

    jobs = sweep_report.collect_jobs(tmp_path)
    assert [j.label for j in jobs] == ["0", "1", "2", "10"]  # numeric order
    assert [j.ok for j in jobs] == [True, False, False, False]
    assert jobs[1].error == "RuntimeError: CUDA out of memory"
    assert "DUE TO TIME LIMIT" in jobs[2].error
    assert "no summary.json" in jobs[3].error and "still running" in jobs[3].error

    sweep_report.write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "failed"]
    assert rows[0]["trainer"] == "smoke" and rows[0]["auc"] == "0.7" and rows[1]["auc"] == ""
    markdown = (tmp_path / "report.md").read_text()
    assert "4 jobs, 3 failed" in markdown and "common overrides: trainer=smoke" in markdown
    assert "| 1 | 0.1 | failed | - | - | - | RuntimeError: CUDA out of memory |" in markdown
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_pareto_front() -> None:
    # (MiB, AUC), fewer bytes better: (1, .70) and (2, .75) and (4, .76) beat (3, .74).
    points = [(4, 0.76), (1, 0.70), (3, 0.74), (2, 0.75)]
    assert sweep_report.pareto_front(points, more_x_is_better=False) == [1, 3, 0]
    # (samples/s, AUC), more samples/s better: only (4, .76) is left.
    assert sweep_report.pareto_front(points, more_x_is_better=True) == [0]


def test_report_of_an_empty_directory_says_how_to_sweep(tmp_path: Path) -> None:
    proc = run(
        [sys.executable, "-m", "trainer.report", str(tmp_path)],
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0 and "+sweep=lr_batch" in proc.stderr


@pytest.mark.slow  # a real multirun; tests/test_search.py runs real (optuna) sweeps in make test
def test_a_real_sweep_with_a_failed_job(tmp_path: Path) -> None:
    """``python -m trainer -m +sweep=lr_batch`` (2 of its learning rates x steps 0 and 3):
    the num_steps=0 jobs fail validation, the sweep goes on, the report shows all 4."""
    sweep = tmp_path / "multirun" / "lr_batch-test"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / ".wandb-home" / var.lower())
    proc = run(
        [
            sys.executable,
            "-m",
            "trainer",
            "-m",
            "+sweep=lr_batch",
            "optim.dense_lr=0.001",  # replaces one axis of the sweep file
            "trainer.batch_size=64",
            "trainer.num_steps=0,3",
            "trainer.eval_every_steps=3",
            "data.num_eval_samples=1024",
            "trainer.eval_batch_size=512",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=env,
        timeout=300,
    )
    # Hydra runs every job, then re-raises the first failure.
    assert proc.returncode != 0 and "trainer.num_steps=0 must be positive" in proc.stderr

    jobs = sweep_report.collect_jobs(sweep)
    assert [
        (j.overrides["optim.embedding_lr"], j.overrides["trainer.num_steps"]) for j in jobs
    ] == [
        ("0.02", "0"),
        ("0.02", "3"),
        ("0.1", "0"),
        ("0.1", "3"),
    ]
    assert [j.ok for j in jobs] == [False, True, False, True]
    assert jobs[0].error == "config error: trainer.num_steps=0 must be positive"
    assert jobs[1].summary["steps"] == 3 and 0 < jobs[1].summary["auc"] < 1

    report = run(
        [sys.executable, "-m", "trainer.report", str(sweep)],
        cwd=REPO,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "4 jobs, 2 failed" in report.stdout
    header = report.stdout.splitlines()[3]
    assert header.startswith("| job | optim.embedding_lr | trainer.num_steps | status | auc |")
    assert (sweep / "pareto.png").stat().st_size > 10_000

    # wandb: one offline run per finished job, grouped by the sweep, named by what varies.
    for job in (jobs[1], jobs[3]):
        wandb_run = read_wandb_run(job.path)
        assert wandb_run["run"].run_group == str(sweep)
        lr = job.overrides["optim.embedding_lr"]
        assert f"optim.embedding_lr={lr}" in wandb_run["run"].display_name
        assert "sweep=" not in wandb_run["run"].display_name
        assert wandb_run["config"]["optim"]["embedding_lr"] == float(lr)
        assert any("sharding_plan" in h for h in wandb_run["history"])
    assert not list(jobs[0].path.glob("wandb/offline-run-*"))
