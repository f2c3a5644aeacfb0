"""The day walk (trainer/online/): evaluate each day before training on it, resume, baseline.

Three tiny days of a strongly drifting stream, 40 steps a day: ``days.jsonl``
has one record per day with the next-day figures; day 0 meets an untrained
model (AUC ~0.5) and later days a trained one; a walk killed mid-day resumes
from its checkpoint's step and day and ends where an unbroken walk ends; the
frozen baseline (trained on day 0 only) is behind on the last day.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF_DIR
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import Config, ConfigError, register_configs, to_config
from trainer.online.days import day_end
from trainer.online.report import DAYS_FILE, DAYS_PLOT, read_records
from trainer.train import train

TINY = [
    "data.cardinalities=[10,50,400,2000]",
    "data.num_dense=3",
    # A signal a tiny model learns in a few steps: dense and per-id effects only.
    "data.num_interactions=0",
    "data.dense_nonlinear_scale=0",
    "data.first_order_scale=1.5",
    "data.num_eval_samples=4096",
    "data.days=3",
    "data.new_id_share=0.2",
    "data.popularity_shift=0.5",
    "data.effect_drift=0.5",
    "online.days=3",
    "online.steps_per_day=40",
    "trainer.num_steps=120",
    "trainer.batch_size=512",
    "trainer.eval_batch_size=2048",
    "trainer.eval_every_steps=40",
    "trainer.checkpoint_every_steps=20",
    "trainer.async_checkpoint=false",
    "trainer.progress_bar=false",
    "trainer.plot=false",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,1]",
    "optim.dense_lr=0.01",
    "optim.embedding_lr=0.2",
]
FIELDS = {"day", "step", "steps", "auc", "oracle_auc", "oracle_gap", "ne", "calibration"}


def _cfg(*overrides: str) -> Config:
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return to_config(compose(config_name="config", overrides=[*TINY, *overrides]))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("walk")
    return run_dir, train(_cfg("trainer.plot=true"), run_dir=run_dir)  # days.png too


def test_the_walk_evaluates_each_day_before_training_on_it(walked) -> None:
    run_dir, summary = walked
    records = read_records(run_dir)
    assert [r["day"] for r in records] == [0, 1, 2]
    assert all(FIELDS <= set(r) for r in records)
    assert [(r["step"], r["steps"]) for r in records] == [(0, 40), (40, 40), (80, 40)]
    day0, day1, day2 = (r["auc"] for r in records)
    assert abs(day0 - 0.5) < 0.1  # nothing trained yet
    assert min(day1, day2) > day0 + 0.05
    for r in records:
        assert r["oracle_gap"] == pytest.approx(r["oracle_auc"] - r["auc"])
        assert r["knowable_gap"] == pytest.approx(r["knowable_auc"] - r["auc"])
        assert r["knowable_auc"] < r["oracle_auc"]  # effects drift, new ids enter
    assert "auc_seen_ids" not in records[0]  # day 0: every id is new
    for r in records[1:]:
        assert 0.2 < r["new_id_samples"] < 0.9
        assert r["knowable_auc_seen_ids"] < r["oracle_auc_seen_ids"]
        assert 0.5 < min(r["auc_seen_ids"], r["auc_new_ids"])
    assert summary["steps"] == 120 and summary["days"] == 3
    assert summary["auc"] == pytest.approx((day1 + day2) / 2)
    gaps = [r["oracle_gap"] for r in records[1:]]
    assert summary["oracle_gap"] == pytest.approx(sum(gaps) / 2)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 120
    assert (run_dir / DAYS_PLOT).stat().st_size > 0
    assert (run_dir / "checkpoints" / "step_120").is_dir()


def test_a_walk_killed_mid_day_resumes_from_its_step_and_day(
    walked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed after step 70: the last checkpoint is step 60, halfway through day 1.
    monkeypatch.setenv("SHARDREC_FAULT_RAISE_AT_STEP", "70")
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "0")
    with pytest.raises(RuntimeError):
        train(_cfg(), run_dir=tmp_path)
    assert [r["day"] for r in read_records(tmp_path)] == [0, 1]
    monkeypatch.delenv("SHARDREC_FAULT_RAISE_AT_STEP")
    summary = train(_cfg(), run_dir=tmp_path)  # trainer.resume=auto
    records = read_records(tmp_path)
    assert [r["day"] for r in records] == [0, 1, 2]  # day 1 not evaluated again mid-day
    assert summary["steps"] == 120
    unbroken = read_records(walked[0])
    for resumed, straight in zip(records, unbroken):
        assert resumed["auc"] == pytest.approx(straight["auc"], abs=2e-3)


def test_incremental_beats_frozen_on_the_last_day(walked, tmp_path: Path) -> None:
    # A longer first day (the history), all the frozen baseline trains.
    first_day = ("online.first_day_steps=60", "trainer.num_steps=60", "trainer.plot=false")
    train(_cfg(*first_day), run_dir=tmp_path)
    frozen = read_records(tmp_path)
    assert [(r["step"], r["steps"]) for r in frozen] == [(0, 60), (60, 0), (60, 0)]
    incremental = read_records(walked[0])
    assert frozen[0]["auc"] == pytest.approx(incremental[0]["auc"])  # the same start
    assert incremental[-1]["auc"] > frozen[-1]["auc"] + 0.01


def test_a_dense_rate_decayed_within_day_0_makes_day_1_the_frozen_models(tmp_path: Path) -> None:
    # optim.dense_decay_steps = the first day: the walk's dense rate is 0 after it (the
    # tables still learn), so on day 1 it is the frozen baseline's model, bit for bit.
    first_day = ("online.first_day_steps=60", "optim.dense_decay_steps=60", "trainer.plot=false")
    runs = {}
    for name, steps in (("frozen", 60), ("walk", 100)):
        train(_cfg(*first_day, f"trainer.num_steps={steps}"), run_dir=tmp_path / name)
        runs[name] = read_records(tmp_path / name)
    assert [r["steps"] for r in runs["walk"]] == [60, 40, 0]
    assert runs["walk"][1]["auc"] == runs["frozen"][1]["auc"]
    assert runs["walk"][2]["auc"] > runs["frozen"][2]["auc"]


def test_online_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="data.days=3"):
        train(_cfg("online.days=4"), run_dir=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="online.steps_per_day"):
        train(_cfg("online.steps_per_day=0"), run_dir=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="online.first_day_steps=-1"):
        train(_cfg("online.first_day_steps=-1"), run_dir=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="optim.dense_decay_steps=-1"):
        train(_cfg("optim.dense_decay_steps=-1"), run_dir=Path("/nonexistent"))


def test_the_first_day_can_be_longer() -> None:
    online = _cfg("online.first_day_steps=100").online  # then 40 a day, 3 days
    ends = [day_end(online, num_steps=10_000, day=d) for d in range(3)]
    assert ends == [100, 140, 180]  # the walk's own budget: 100 + 2 * 40
    assert [day_end(online, num_steps=150, day=d) for d in range(3)] == [100, 140, 150]
    assert day_end(_cfg().online, num_steps=120, day=1) == 80  # 0: steps_per_day


def test_the_days_file_is_one_record_a_line(walked) -> None:
    lines = (walked[0] / DAYS_FILE).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["day"] == i for i, line in enumerate(lines))
