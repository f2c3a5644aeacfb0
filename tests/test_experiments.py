"""Every experiment under conf/experiment/ composes, and every one meant to train runs a step.

Experiments only override the groups, so a renamed key or group option breaks
them silently unless something composes them. Each trainable one runs one
training step (and its eval and, where it sets ``trainer.export``, its export)
in this process through ``train(cfg)``, on tiny batches. The planning-only
MLPerf shapes (78 GiB of tables) get a plan for 64 GPUs instead:
``tests/test_plan_cli.py::test_mlperf_dcnv2_composes_and_plans_for_64_gpus``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CONF_DIR
from trainer.config.schema import Config, to_config
from trainer.train import train

EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
)
# Too large to train here; planned in tests/test_plan_cli.py.
PLANNING_ONLY = {"mlperf_dcnv2"}
ONE_STEP = [
    "trainer.num_steps=1",
    "trainer.batch_size=64",
    "trainer.eval_every_steps=1",
    "trainer.eval_batch_size=256",
    "data.num_eval_samples=256",
    "trainer.progress_bar=false",
    "trainer.plot=false",
]


def test_the_experiments_are_found() -> None:
    assert "mlperf_dcnv2" in EXPERIMENTS and "compression/int4_qat" in EXPERIMENTS
    assert PLANNING_ONLY <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(compose_cfg, name: str) -> None:
    assert isinstance(to_config(compose_cfg([f"experiment={name}"])), Config)


@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - PLANNING_ONLY))
def test_experiment_trains_one_step(compose_cfg, name: str, tmp_path: Path) -> None:
    # A day walk: two of its days (evaluate, train, publish; then evaluate the next).
    walk = ["online.days=2", "data.days=2"] if name.startswith("online/") else []
    cfg = to_config(compose_cfg([f"experiment={name}", *ONE_STEP, *walk]))
    summary = train(cfg, run_dir=tmp_path)
    assert summary["steps"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1
    if cfg.trainer.export:  # (a dim-4 student's int4 rows are no smaller: alignment)
        assert {"auc", "bytes", "fp32_bytes", "bits"} <= set(summary["export"])
        assert (tmp_path / "bundle" / "model.pt2").stat().st_size > 0
