"""Defaults that train in a short run (issue 21), and the dense rate's schedule.

One epoch of a small planted set (8192 samples, 32 steps of 256) with the
optimizer defaults of conf/optim must come close to a logistic regression on
the same samples' one-hot features: before the study
(docs/studies/2026-12-05-defaults.md) the default dense Adam at 1e-3 hardly
moved the MLPs in so few steps. The schedule tests pin ``DenseLRSchedule``'s
rates and that a resumed run (``seek``) continues where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from sharding.dmp import DenseLRSchedule
from tests.test_synthetic_data import one_hot_features
from trainer.config.schema import OptimConfig, to_config
from trainer.data import SyntheticCriteo
from trainer.train import train

# A small planted set: the tables carry the signal, as in tests/test_learning.py.
SMALL_SET = [
    "data.cardinalities=[7,50,1000,3000]",
    "data.num_dense=3",
    "data.num_interactions=2",
    "data.dense_scale=0.2",
    "data.dense_nonlinear_scale=0.1",
    "data.first_order_scale=0.8",
    "data.num_eval_samples=8192",
]
EPOCH = ["trainer.num_steps=32", "trainer.batch_size=256", "trainer.eval_every_steps=32"]
QUIET = ["trainer.progress_bar=false", "trainer.plot=false", "trainer.num_threads=1"]
# How far under the logistic regression one epoch may land (see the assert).
MARGIN = 0.02


def _schedule(warmup: int, schedule: str, total: int = 100) -> DenseLRSchedule:
    opt = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    return DenseLRSchedule(opt, warmup_steps=warmup, schedule=schedule, total_steps=total)


def _rates(s: DenseLRSchedule, steps: int) -> list[float]:
    """The rate each of ``steps`` training steps runs at, stepping as the loop does."""
    out = []
    for _ in range(steps):
        out.append(s.get_last_lr()[0])
        s.scheduler.optimizer.step()
        s.step()
    return out


def test_the_conf_file_and_the_dataclass_agree(compose_cfg) -> None:
    composed = to_config(compose_cfg([])).optim
    assert composed == OptimConfig()


def test_warmup_ramps_then_holds_or_decays() -> None:
    assert _rates(_schedule(4, "constant"), 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    linear = _rates(_schedule(0, "linear_decay", total=10), 10)
    assert linear == pytest.approx([0.1 * (1 - s / 10) for s in range(10)])
    cosine = _rates(_schedule(2, "cosine", total=12), 12)
    assert cosine[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert cosine[7] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[-1] < 0.01


def test_the_decay_can_end_early_and_restart() -> None:
    # A day walk: the decay ends with the first day (6 steps), then restarts each day (4).
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    kept = DenseLRSchedule(opt, warmup_steps=0, schedule="linear_decay", total_steps=6)
    assert _rates(kept, 8)[5:] == pytest.approx([0.1 / 6, 0.0, 0.0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    days = DenseLRSchedule(
        opt, warmup_steps=0, schedule="linear_decay", total_steps=6, restart_steps=4
    )
    assert _rates(days, 14)[6:] == pytest.approx([0.1, 0.075, 0.05, 0.025] * 2)


def test_a_resumed_schedule_continues_where_it_stopped() -> None:
    straight = _rates(_schedule(5, "cosine"), 40)
    resumed = _schedule(5, "cosine")
    resumed.seek(17)  # what Trainer.load_state_dict does with the checkpoint's step
    assert _rates(resumed, 23) == pytest.approx(straight[17:])


def test_bad_schedule_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="optim.dense_warmup_steps"):
        _schedule(-1, "constant")
    with pytest.raises(ValueError, match="optim.dense_lr_schedule"):
        _schedule(0, "step")


def test_one_epoch_of_a_small_set_with_the_defaults_nears_a_linear_model(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates: list[float] = []  # the loop steps the default schedule once per step
    step = DenseLRSchedule.step
    monkeypatch.setattr(
        DenseLRSchedule, "step", lambda self: (rates.append(self.get_last_lr()[0]), step(self))
    )
    cfg = to_config(compose_cfg([*SMALL_SET, *EPOCH, *QUIET]))
    summary = train(cfg, run_dir=tmp_path)
    assert len(rates) == 32 and rates[0] == cfg.optim.dense_lr and rates[-1] < rates[0] / 50
    data = SyntheticCriteo(cfg.data)
    samples = cfg.trainer.num_steps * cfg.trainer.batch_size
    x, y = one_hot_features(data, "train", samples)  # the very samples the epoch trained on
    x_eval, y_eval = one_hot_features(data, "eval", cfg.data.num_eval_samples)
    with threadpool_limits(1):
        fitted = LogisticRegression(C=0.1, max_iter=300).fit(x, y)
    linear = float(roc_auc_score(y_eval, fitted.predict_proba(x_eval)[:, 1]))
    print(f"auc {summary['auc']:.4f}, linear {linear:.4f}, oracle {summary['oracle_auc']:.4f}")
    assert summary["steps"] == 32
    assert summary["auc"] >= linear - MARGIN
