"""The size budget: the chooser's pick fits and is the least-loss one; on a tiny model the
trainer measures, chooses, trains and serves a bundle whose table bytes meet the budget."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from compression.budget import Candidate, choose, format_choice, row_bytes
from trainer.builder.budget import BUDGET_FILE, qr_fit
from trainer.config.schema import to_config


def _brute_force(candidates: dict[str, list[Candidate]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*candidates.values()):
        if sum(c.bytes for c in combo) <= budget:
            best = min(best, sum(c.sensitivity for c in combo))
    return best


def test_chooser_fits_the_budget_and_takes_the_cheapest_loss() -> None:
    candidates = {
        "big": [
            Candidate("int8", 8000, 0.0),
            Candidate("int4", 5000, 0.001),
            Candidate("int2", 3000, 0.010),
            Candidate("qr", 500, 0.004),
        ],
        "small": [Candidate("int8", 900, 0.0), Candidate("int2", 300, 0.020)],
    }
    # 6000 bytes: int4 on big (0.001) beats squeezing small (0.02); qr dominates int2.
    picked = choose(candidates, budget_bytes=6000)
    assert {n: c.choice for n, c in picked.items()} == {"big": "int4", "small": "int8"}
    picked = choose(candidates, budget_bytes=2000)
    assert {n: c.choice for n, c in picked.items()} == {"big": "qr", "small": "int8"}
    assert "total" in format_choice(picked, rows={"big": 100, "small": 10}, budget_bytes=2000)
    with pytest.raises(ValueError, match="smallest choice"):
        choose(candidates, budget_bytes=700)


def test_chooser_on_random_instances_fits_and_is_near_the_optimum() -> None:
    rng = random.Random(0)
    worse = 0
    for _ in range(200):
        candidates = {
            f"t{i}": [
                Candidate(f"c{j}", rng.randint(10, 1000), rng.random() * 0.01) for j in range(4)
            ]
            for i in range(4)
        }
        low = sum(min(c.bytes for c in cs) for cs in candidates.values())
        high = sum(max(c.bytes for c in cs) for cs in candidates.values())
        budget = rng.randint(low, high)
        picked = choose(candidates, budget_bytes=budget)
        assert sum(c.bytes for c in picked.values()) <= budget
        loss = sum(c.sensitivity for c in picked.values())
        best = _brute_force(candidates, budget)
        assert loss <= best + 0.01  # within one candidate's loss (greedy on hulls)
        worse += loss > best + 1e-12
    assert worse < 60  # mostly exact


def test_row_bytes_are_fbgemms_packed_rows() -> None:
    assert row_bytes(64, None) == 256
    assert (row_bytes(64, 8), row_bytes(64, 4), row_bytes(64, 2)) == (80, 48, 32)


def test_qr_fit_recovers_a_product_table() -> None:
    import torch

    torch.manual_seed(0)
    q, r = torch.rand(5, 3) + 0.5, torch.rand(4, 3) + 0.5
    idx = torch.arange(18)  # 18 rows: the last quotient bucket is partly empty
    w = q[idx // 4] * r[idx % 4]
    fq, fr = qr_fit(w, 4)
    torch.testing.assert_close(fq[idx // 4] * fr[idx % 4], w, atol=1e-4, rtol=0)


def test_budget_run_serves_tables_within_the_budget(compose_cfg, tmp_path: Path) -> None:
    from trainer.train import train  # in this process: a world of one

    cfg = to_config(
        compose_cfg(
            [
                "trainer=smoke",
                "trainer.num_steps=6",
                "trainer.eval_every_steps=6",
                "trainer.batch_size=64",
                "trainer.eval_batch_size=512",
                "trainer.progress_bar=false",
                "trainer.plot=false",
                "trainer.export=true",
                "data.num_eval_samples=1024",
                "data.cardinalities=[400,1000,7,640]",
                "data.num_dense=4",
                "data.num_interactions=3",
                "model.embedding_dim=32",
                "model.dense_arch_layer_sizes=[16,32]",
                "model.over_arch_layer_sizes=[16,1]",
                "budget.ratio=0.1",
                "budget.probe_steps=20",
                "budget.eval_batches=1",
                "budget.min_rows=300",
            ]
        )
    )
    summary = train(cfg, run_dir=tmp_path)
    report = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert report["budget_bytes"] == int(0.1 * 2047 * 32 * 4)
    assert report["chosen_bytes"] <= report["budget_bytes"]
    # int2 everywhere (16 bytes a row) would be 1/8: some table had to be split.
    assert any(t["choice"].startswith("qr") for t in report["tables"].values())
    export = summary["export"]
    assert export["table_bytes"] <= report["budget_bytes"]
    # The export's fp32 bytes are those of the stored (split) tables, in fp32.
    assert export["fp32_table_bytes"] < report["fp32_bytes"]
    assert {"auc", "bytes", "fp32_bytes"} <= export.keys()
    assert export["max_abs_logit_diff"] <= 1e-5  # the served bits are the QAT bits


def test_budget_probe_reads_a_prepared_table_data_set(compose_cfg, tmp_path: Path) -> None:
    """The probe trains on any data source (it once read synthetic's ``batch()`` only)."""
    from tests.test_predict_table import _planted
    from trainer.data.data_configs import TableDataConfig
    from trainer.prepare import prepare
    from trainer.train import train  # in this process: a world of one

    events, _, _ = _planted(tmp_path)
    keys = dict(label="clicked", dense=["price"], categorical=["user"], multi_hot=["tags"])
    shards = tmp_path / "shards"
    prepare(TableDataConfig(raw=[str(events)], dir=str(shards), table_rows=[64], **keys))
    overrides = [
        "data=table",
        f"data.dir={shards}",
        f"data.raw=[{events}]",
        "data.label=clicked",
        "data.dense=[price]",
        "data.categorical=[user]",
        "data.multi_hot=[tags]",
        "data.table_rows=[64]",
        "trainer=smoke",
        "trainer.num_steps=4",
        "trainer.eval_every_steps=4",
        "trainer.batch_size=64",
        "trainer.export=true",
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "budget.ratio=0.1",
        "budget.probe_steps=4",
        "budget.eval_batches=1",
        "budget.min_rows=32",
    ]
    summary = train(to_config(compose_cfg(overrides)), run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / BUDGET_FILE).read_text())
    assert report["chosen_bytes"] <= report["budget_bytes"]
    assert summary["export"]["table_bytes"] <= report["budget_bytes"]
