"""Optuna search (``hydra/sweeper=optuna``, ``+sweep=search/*``): a real tiny sweep
shares its study in SQLite and in PostgreSQL, the report lists trials and the best,
and a trial whose intermediate AUC is below the median is pruned.

Example::

    pytest tests/test_search.py -k sqlite
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig

from tests.conftest import REPO
from tests.processes import run
from trainer import search
from trainer.config.compose import CONF_DIR, _sweep_jobs
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs
from trainer.report import optuna_trials
from trainer.report import sweep as sweep_report

TINY = [
    "trainer.num_steps=4",
    "trainer.eval_every_steps=2",  # one intermediate eval: the pruner's chance
    "data.num_eval_samples=1024",
    "trainer.eval_batch_size=512",
    "trainer.plot=false",
    "trainer.batch_size=choice(64,128)",
]


def _search(sweep: Path, trials: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run(
        [
            sys.executable,
            "-m",
            "trainer",
            "-m",
            "+sweep=search/lr",
            f"hydra.sweeper.n_trials={trials}",
            *TINY,
            f"hydra.sweep.dir={sweep}",
            "hydra.job.env_set.SHARDREC_PRUNER_STARTUP_TRIALS=1",
            *extra,
        ],
        cwd=REPO,
        env=env,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_study(sweep: Path, study: optuna.study.Study, trials: int) -> None:
    """Every trial ran as a job whose summary holds the AUC the study holds."""
    assert len(study.trials) == trials
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        job = sweep / str(trial.user_attrs["job_num"])
        summary = json.loads((job / "summary.json").read_text())
        assert trial.value == pytest.approx(summary["auc"])
        pruned = bool(trial.user_attrs.get("pruned"))
        assert pruned == ("stopped_early" in summary), summary
        assert summary["steps"] == (2 if pruned else 4)
    sweep_report.main([str(sweep)])
    report = (sweep / "report.md").read_text()
    best = optuna_trials.best_trial(study)
    assert best is not None
    assert f"best: trial {best.number}, auc {best.value:.4f}" in report
    assert f"{trials} trials" in report and "parameter importance" in report
    assert (sweep / "trials.csv").read_text().count("\n") == trials + 1


def test_a_search_of_three_trials_in_sqlite(tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    _search(sweep, 3)
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    study = optuna.load_study(study_name="search_lr", storage=f"sqlite:///{sweep}/optuna.db")
    _check_study(sweep, study, 3)


def test_a_search_shares_its_study_in_postgres(tmp_path: Path, postgres_url: str) -> None:
    sweep, name = tmp_path / "search", f"test_{uuid.uuid4().hex[:12]}"
    try:
        shared = [f"hydra.sweeper.storage={postgres_url}", f"hydra.sweeper.study_name={name}"]
        _search(sweep, 2, *shared)
        _check_study(sweep, optuna.load_study(study_name=name, storage=postgres_url), 2)
        assert not (sweep / "optuna.db").exists()
    finally:
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


def test_a_trial_below_the_median_is_pruned(tmp_path: Path) -> None:
    """TrialPruning finds its job's trial and stops it under the finished trials' median."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for auc in (0.70, 0.72):
        trial = study.ask()
        trial.report(auc, 2)
        study.tell(trial, auc + 0.01)
    for job in (2, 3):  # two running trials, as the sweeper tagged them
        trial = study.ask()
        trial.set_user_attr("sweep_dir", "multirun/x")
        trial.set_user_attr("job_num", job)

    def pruning(job: int) -> search.TrialPruning:
        return search.TrialPruning(
            storage=storage,
            study_name="s",
            sweep_dir="multirun/x",
            job_num=job,
            pruner=search.make_pruner({search.STARTUP_ENV: "2"}),
        )

    assert pruning(3)(2, {"auc": 0.75}) is None  # above the median: goes on
    assert pruning(7)(2, {"auc": 0.1}) is None  # no trial for this job: never prunes
    reason = pruning(2)(2, {"auc": 0.60})
    assert reason is not None and reason.startswith("pruned: optuna trial 2")
    trials = optuna.load_study(study_name="s", storage=storage).trials  # not the cached ones
    assert trials[2].user_attrs["pruned"] is True and "pruned" not in trials[3].user_attrs
    assert isinstance(search.make_pruner({search.PRUNER_ENV: "none"}), optuna.pruners.NopPruner)


def _sweep_params(sweep: str) -> tuple[DictConfig, dict[str, str]]:
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", [f"+sweep={sweep}"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    return cfg, {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}


def test_the_grid_spans_the_search_space_in_80_points() -> None:
    """search/lr_grid (the grid a 20-trial search is measured against) is 80 jobs over
    search/lr's ranges: each axis from the search's low end to its high end."""
    cfg, grid = _sweep_params("search/lr_grid")
    assert len(_sweep_jobs(cfg, ["+sweep=search/lr_grid"])) == 80
    _, searched = _sweep_params("search/lr")
    space, _ = create_params_from_overrides([f"{k}={v}" for k, v in searched.items()])
    assert set(grid) == set(space)
    for key, dist in space.items():
        values = [float(v) for v in grid[key].split(",")]
        choices = getattr(dist, "choices", None)
        if choices is not None:
            assert values == [float(c) for c in choices], key
        else:
            assert (min(values), max(values)) == pytest.approx((dist.low, dist.high)), key
