"""``python -m trainer.plan``: plans for clusters that are not there.

The command runs for real (a subprocess, the repo's conf/); the MLPerf shapes
are planned in-process for 64 GPUs, as a user would from a laptop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharding.fit import explain_no_fit, table_bytes
from sharding.report import format_ranks
from tests.conftest import REPO
from tests.processes import run
from trainer.config.schema import ConfigError, to_config
from trainer.config.tables import run_tables
from trainer.plan.cluster import plan_cluster

EBC = "model.sparse_arch.embedding_bag_collection"


def _plan_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, "-m", "trainer.plan", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_plans_a_world_of_8_gpus_from_a_cpu_machine(tmp_path: Path) -> None:
    proc = _plan_cli(tmp_path, "topology.world_size=8", "topology.local_world_size=4")
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["world_size"] == 8 and saved["compute_device"] == "cuda"
    tables = saved["plan"][EBC]
    assert len(tables) == 26
    for name, entry in tables.items():
        assert entry["ranks"] and all(0 <= r < 8 for r in entry["ranks"]), name
    assert [r["rank"] for r in saved["ranks"]] == list(range(8))
    for rank in saved["ranks"]:
        assert 0 < rank["hbm_used_bytes"] <= rank["hbm_budget_bytes"] < rank["hbm_cap_bytes"]
        assert rank["cost_ms"] > 0
    assert {t["name"] for t in saved["tables"]} == set(tables)
    assert "peak HBM" in proc.stdout and "t_cat_25" in proc.stdout
    assert (tmp_path / "plan.txt").read_text().strip() in proc.stdout
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_a_model_that_cannot_fit_says_which_tables_and_how_many_bytes(tmp_path: Path) -> None:
    proc = _plan_cli(tmp_path, "topology.world_size=2", "topology.hbm_gb=0.0005")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(message.splitlines()) == 1
    expected = ["does not fit", "t_cat_", "bytes", "need", "2 cuda devices offer"]
    for part in [*expected, "topology.hbm_gb=0.0005", "topology.world_size"]:
        assert part in message
    assert not (tmp_path / "plan.json").exists()


def test_world_size_is_required(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topology.world_size is required"):
        plan_cluster(to_config(compose_cfg([])), run_dir=tmp_path)


def test_table_wise_names_the_tables_larger_than_one_device() -> None:
    tables = [
        table_bytes("t_big", num_embeddings=40_000_000, embedding_dim=128),
        table_bytes("t_small", num_embeddings=1000, embedding_dim=128),
    ]
    message = explain_no_fit(
        tables,
        strategy="table_wise",
        world_size=64,
        compute_device="cuda",
        hbm_gb=16,
        ddr_gb=64,
        storage_reservation_percentage=0.15,
    )
    # 40M rows x 128 fp32 + one fp32 row-wise Adagrad accumulator per row.
    assert "t_big 19.22 GiB (20,640,000,000 bytes)" in message and "t_small" not in message
    assert "13.60 GiB" in message and "sharding=auto" in message


def test_format_ranks_collapses_runs() -> None:
    assert format_ranks([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"


def test_mlperf_dcnv2_composes_and_plans_for_64_gpus(compose_cfg, tmp_path: Path) -> None:
    cfg = to_config(
        compose_cfg(
            [
                "experiment=mlperf_dcnv2",
                "topology.world_size=64",
                "topology.local_world_size=8",
                "topology.hbm_gb=80",
            ]
        )
    )
    assert cfg.model.arch == "dlrm_dcnv2" and cfg.model.embedding_dim == 128
    assert max(cfg.data.cardinalities) == 40_000_000 and len(cfg.data.cardinalities) == 26
    features = cfg.data.features
    assert run_tables(cfg, features=features).pooling_factors()["t_cat_20"] == [100.0]

    result = plan_cluster(cfg, run_dir=tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert len(saved["plan"][EBC]) == 26 and len(saved["ranks"]) == 64
    # ~78 GiB of tables and optimizer state spread over 64 x 80 GB: a few GiB per rank.
    assert 1 * 1024**3 < result.peak_hbm_bytes < 68 * 1024**3
