"""The commands a user runs: ``python -m trainer`` and ``torchrun ... -m trainer``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port, torchrun_trainer
from tests.processes import run

TINY = [
    "trainer=smoke",
    "trainer.num_steps=8",
    "trainer.eval_every_steps=4",
    "data.num_eval_samples=2048",
    "trainer.eval_batch_size=512",
    "trainer.plot=false",  # ~1 s of matplotlib per run; the tests here that read curves.png plot
]
PLOT = "trainer.plot=true"
SUMMARY_KEYS = {
    "auc",
    "oracle_auc",
    "logloss",
    "ne",
    "calibration",
    "samples_per_sec",
    "steps",
    "world_size",
}


def _check_outputs(run_dir: Path, *, world_size: int, strategy: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 8 and summary["world_size"] == world_size
    assert summary["samples_per_sec"] > 0
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == world_size and plan["strategy"] == strategy
    tables = plan["plan"]["model.sparse_arch.embedding_bag_collection"]
    assert len(tables) == 26
    if strategy != "auto":
        assert {t["sharding_type"] for t in tables.values()} == {strategy}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "auc" in r]
    assert [r["step"] for r in evals] == [4, 8]
    # The summary is the last eval, over the whole eval set, whatever the world size.
    for key in ("auc", "logloss", "ne", "calibration"):
        assert summary[key] == evals[-1][key], key
    assert evals[-1]["num_samples"] == 2048
    # NE is the log loss over the entropy of the eval set's click rate.
    ctr = evals[-1]["ctr"]
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert summary["ne"] == pytest.approx(summary["logloss"] / entropy, rel=1e-4)
    # 8 steps only move the logits from 0 (loss ln 2 = 0.69) toward the base rate
    # (measured 0.70 -> 0.58), too few to rank clicks (AUC ~0.5, measured 0.4996);
    # tests/test_learning.py shows the trainer learning.
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.05
    assert 0.75 < summary["oracle_auc"] < 0.85  # the planted model's, on these 2048 samples
    assert (run_dir / "curves.png").stat().st_size > 1000
    return plan


@pytest.mark.dist
def test_python_m_trainer_single_process(tmp_path: Path) -> None:
    proc = run(
        [sys.executable, "-m", "trainer", *TINY, PLOT, f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle_auc" in proc.stdout
    _check_outputs(tmp_path, world_size=1, strategy="auto")


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["row_wise"])
def test_torchrun_two_ranks_shards_the_tables(tmp_path: Path, strategy: str) -> None:
    torchrun_trainer(f"sharding={strategy}", *TINY, PLOT, run_dir=tmp_path)
    plan = _check_outputs(tmp_path, world_size=2, strategy=strategy)
    shards = plan["plan"]["model.sparse_arch.embedding_bag_collection"]["t_cat_0"]["shards"]
    assert sorted(s["rank"] for s in shards) == [0, 1]


@pytest.mark.slow  # 2 torchrun nodes; hierarchical equivalence stays (test_sharding_equivalence)
@pytest.mark.dist
def test_two_torchrun_nodes_train_table_row_wise(tmp_path: Path) -> None:
    """Two torchrun "hosts" on one machine (2 x 2 processes), static rendezvous."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                str(torchrun),
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=2",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "trainer",
                "sharding=table_row_wise",
                *TINY,
                PLOT,
                f"hydra.run.dir={tmp_path}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=500) for p in nodes]
    for p, (_out, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]
    plan = _check_outputs(tmp_path, world_size=4, strategy="table_row_wise")
    tables = plan["plan"]["model.sparse_arch.embedding_bag_collection"]
    # Table-row-wise keeps each table on one host: its shards span that host's 2 ranks.
    hosts = {tuple(sorted({s["rank"] // 2 for s in t["shards"]})) for t in tables.values()}
    assert hosts <= {(0,), (1,)} and len(hosts) == 2
