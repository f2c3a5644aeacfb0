"""Resume onto any plan: a 2-rank ``table_wise`` checkpoint continues on other plans.

One checkpoint (module fixture: 2 forked ranks, ``table_wise``, 8 steps,
``step_4`` kept) is resumed on 1 rank ``auto`` (in this process), 4 ranks
``row_wise`` and 4 ranks as 2 hosts ``table_row_wise``
(``topology.local_world_size=2``), each with the same global batch (per-rank
batch x world size = 512). DCP reshards the tables and their fused row-wise
Adagrad state onto the new plan; steps 5-8 are trained again. The step-8
train loss, AUC and log loss equal the original run's within ``ATOL`` (sums run
in another order on another plan; measured differences are printed).

A table that would move between a fused kernel and ``data_parallel`` (its
optimizer state changes from a sharded ``momentum1`` to the dense optimizer's
``exp_avg``/``exp_avg_sq``) is refused with a ``ConfigError`` naming the tables
and what to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import fork_trainer
from tests.test_faults_kill import records, torchrun
from tests.test_train_e2e import TINY
from trainer.config.schema import ConfigError, to_config

SAVED = [*TINY, "trainer.eval_every_steps=4", "trainer.checkpoint_every_steps=4"]
SAVED += ["trainer.progress_bar=false", "trainer.plot=false", "trainer.checkpoint_keep=2"]
GLOBAL_BATCH = 512  # TINY's per-rank 256 x 2 ranks
ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("table_wise_2")
    fork_trainer(*SAVED, "sharding=table_wise", run_dir=run_dir, nproc=2)
    return run_dir


def _step8(run_dir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in records(run_dir):
        if record["step"] == 8:
            out.update({k: v for k, v in record.items() if k != "step"})
    return out


def _compare(saved: Path, resumed: Path, label: str) -> None:
    want, got = _step8(saved), _step8(resumed)
    diffs = {k: abs(got[k] - want[k]) for k in ("train_loss", "auc", "logloss")}
    print(
        f"table_wise x2 -> {label}: |diff| at step 8 "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    assert max(diffs.values()) < ATOL, diffs
    assert [r["step"] for r in records(resumed)] == [8, 8]  # steps 5-8, nothing before


def _in_process(compose_cfg, overrides: list[str], run_dir: Path) -> dict:
    from trainer.train import train  # in this process: a world of one

    return train(to_config(compose_cfg(overrides)), run_dir=run_dir)


def test_resume_on_one_rank(saved: Path, compose_cfg, tmp_path: Path) -> None:
    summary = _in_process(
        compose_cfg,
        [
            *SAVED,
            "sharding=auto",  # never data_parallel: the fused tables stay fused
            f"trainer.batch_size={GLOBAL_BATCH}",
            f"trainer.resume={saved}/checkpoints/step_4",
        ],
        tmp_path,
    )
    assert summary["world_size"] == 1
    _compare(saved, tmp_path, "1 rank auto")


@pytest.mark.slow  # 4 ranks; resuming on one rank (another plan) stays in make test
@pytest.mark.dist
@pytest.mark.parametrize(
    ("label", "overrides"),
    [
        ("4 ranks row_wise", ["sharding=row_wise"]),  # about 17 s each on 2 cores
        (
            "4 ranks (2 hosts) table_row_wise",
            ["sharding=table_row_wise", "topology.local_world_size=2"],
        ),
    ],
)
def test_resume_on_four_ranks(saved: Path, tmp_path: Path, label: str, overrides: list) -> None:
    proc = torchrun(
        *SAVED,
        *overrides,
        f"trainer.batch_size={GLOBAL_BATCH // 4}",
        f"trainer.resume={saved}/checkpoints/step_4",
        run_dir=tmp_path,
        nproc=4,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["world_size"] == 4
    _compare(saved, tmp_path, label)


def test_a_table_moving_to_data_parallel_is_refused(
    saved: Path, compose_cfg, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="changed between a fused kernel and data_parallel"):
        _in_process(
            compose_cfg,
            [
                *SAVED,
                "sharding=data_parallel",
                f"trainer.batch_size={GLOBAL_BATCH}",
                f"trainer.resume={saved}/checkpoints/step_4",
            ],
            tmp_path,
        )
