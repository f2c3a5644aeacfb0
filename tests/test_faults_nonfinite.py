"""Poisoned steps: a NaN loss stops the run (naming the step) or is skipped on every rank.

The NaN is real: ``SHARDREC_FAULT_NAN_AT_STEP=6`` gives one rank's batch of
step 6 NaN dense features (trainer/resilience/fault_injection.py), so that rank's loss is NaN.

- ``stop`` (default), one process: the run raises ``NonfiniteError`` naming
  step 6 and the last good checkpoint (``step_4``); no checkpoint is written
  after it (the step-8 save would have been the first from poisoned weights).
- ``skip``, 2 ranks (``python -m trainer``, forked), NaN on rank 1 only: both ranks skip step 6
  together (one all-reduce per step), the run finishes with finite losses and
  weights, the summary counts ``nonfinite_steps_skipped: 1``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.distributed import fork_trainer
from tests.test_faults_kill import records
from tests.test_train_e2e import TINY
from trainer.checkpoint.load import complete_checkpoints
from trainer.config.schema import to_config
from trainer.resilience.nonfinite import NonfiniteError

RUN = [*TINY, "trainer.checkpoint_every_steps=4", "trainer.progress_bar=false"]
RUN += ["trainer.plot=false"]


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.train import train  # in this process: a world of one

    monkeypatch.setenv("SHARDREC_FAULT_NAN_AT_STEP", "6")
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "0")
    with pytest.raises(NonfiniteError) as info:
        train(to_config(compose_cfg(RUN)), run_dir=tmp_path)
    message = str(info.value)
    assert "at step 6" in message and "step_4" in message and "on_nonfinite=skip" in message
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_4"]
    assert not list(ckpts.glob(".tmp-*"))


@pytest.mark.dist
def test_skip_drops_the_poisoned_step_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDREC_FAULT_NAN_AT_STEP", "6")  # the ranks' environment
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "1")
    fork_trainer(*RUN, "trainer.on_nonfinite=skip", run_dir=tmp_path, nproc=2)
    log = (tmp_path / "__main__.log").read_text()  # both ranks' job log (Hydra's)
    assert "step 6: non-finite loss on some rank; step skipped" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 8
    losses = [r["train_loss"] for r in records(tmp_path) if "train_loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(summary["logloss"]) and 0.0 <= summary["auc"] <= 1.0
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [
        "step_4",
        "step_8",
    ]
