"""The planner CLI plans what the trainer plans: one planning path.

For a config with per-table overrides (a strategy, pinned ranks for a
table-wise and a column-wise table), 16-bit tables and, in the second test,
the UVM-caching kernel, the ``plan`` section of the planner's ``plan.json``
(:func:`trainer.plan.cluster.plan_cluster`, what ``python -m trainer.plan`` runs after
composing) equals the plan the trainer makes for the same world size:

- a real 2-rank ``python -m trainer`` (1 step, ranks forked by ``fork_trainer``) on CPU
  writes its plan.json;
- UVM caching needs CUDA to train, so two real gloo ranks plan for a CUDA world
  (``trainer.planning.plan_model`` called as ``trainer.builder.model.build`` calls it,
  rank 0 planning and broadcasting), without building the sharded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharding import destroy_distributed, init_distributed, save_plan
from tests.distributed import fork_trainer, run_ranks
from trainer.builder.compression import build_converters
from trainer.config.schema import Config, to_config
from trainer.config.tables import run_tables
from trainer.config.validate import open_source
from trainer.plan.cluster import plan_cluster
from trainer.plan.run_plan import World, plan_meta_model

EBC = "model.sparse_arch.embedding_bag_collection"
OVERRIDES = [
    "sharding=table_wise",
    "+sharding.tables={t_cat_0:{strategy:table_wise,ranks:[1]},t_cat_1:{strategy:row_wise},"
    "t_cat_2:{strategy:column_wise,ranks:[1,0]}}",
    "sharding.column_shard_dim=8",  # t_cat_2's 16 columns: two blocks, on ranks 1 and 0
    "precision=fp16",  # 16-bit tables: half the bytes the planner balances
]
TINY = [
    "data.cardinalities=[100,50,1000,7,300,20000]",  # 6 tables: planning stays quick
    "trainer=smoke",
    "trainer.num_steps=1",
    "trainer.eval_every_steps=1",
    "data.num_eval_samples=512",
    "trainer.eval_batch_size=256",
    "trainer.plot=false",
    "trainer.progress_bar=false",
]
TOPOLOGY_2 = ["topology.world_size=2", "topology.local_world_size=2"]


def _cli_plan(compose_cfg, overrides: list[str], run_dir: Path) -> dict:
    plan_cluster(to_config(compose_cfg([*overrides, *TOPOLOGY_2])), run_dir=run_dir)
    return json.loads((run_dir / "plan.json").read_text())


def _check_overrides(tables: dict) -> None:
    assert len(tables) == 6
    assert tables["t_cat_0"]["sharding_type"] == "table_wise"
    assert tables["t_cat_0"]["ranks"] == [1]
    assert tables["t_cat_1"]["sharding_type"] == "row_wise"
    assert tables["t_cat_2"]["sharding_type"] == "column_wise"
    assert [s["rank"] for s in tables["t_cat_2"]["shards"]] == [1, 0]


@pytest.mark.dist
def test_cli_plan_equals_the_plan_a_two_rank_trainer_writes(compose_cfg, tmp_path: Path) -> None:
    trained = tmp_path / "train"
    fork_trainer(*OVERRIDES, *TINY, run_dir=trained)
    trainer_plan = json.loads((trained / "plan.json").read_text())
    cli_overrides = [*OVERRIDES, *TINY, "topology.compute_device=cpu"]
    cli = _cli_plan(compose_cfg, cli_overrides, tmp_path / "cli")
    assert cli["plan"] == trainer_plan["plan"]
    _check_overrides(cli["plan"][EBC])
    # The planner sized fp16 rows, 2 bytes a value: t_cat_5's weights, optimizer
    # state and buffers (measured 761,920 bytes) are fewer than its fp32 weights alone.
    t = next(t for t in cli["tables"] if t["name"] == "t_cat_5")
    assert 20_000 * 16 * 2 < t["ddr_bytes"] < 20_000 * 16 * 4


def _plan_for_cuda(rank: int, cfg: Config, out_dir: str) -> None:
    """What trainer.builder.model.build does up to the plan, for a CUDA world, on gloo."""
    env = init_distributed(device="cpu")
    try:
        source = open_source(cfg.data)
        tables = run_tables(cfg, features=source.features)
        converters = build_converters(cfg, tables=tables, device_type="cuda")
        _, planned = plan_meta_model(
            cfg,
            tables=tables,
            num_dense=source.num_dense,
            converters=converters,
            world=World(world_size=2, local_world_size=2, device=torch.device("cuda")),
            pg=env.pg,
        )
        save_plan(planned.plan, Path(out_dir) / f"plan-rank{rank}.json")
    finally:
        destroy_distributed()


@pytest.mark.dist
def test_cli_plan_equals_the_trainer_plan_with_uvm_caching(compose_cfg, tmp_path: Path) -> None:
    uvm = [
        *OVERRIDES,
        "sharding.compute_kernel=fused_uvm_caching",
        "sharding.cache_load_factor=0.35",
    ]
    cfg = to_config(compose_cfg([*uvm, *TINY]))
    run_ranks(_plan_for_cuda, cfg, str(tmp_path), world_size=2)
    ranks = [json.loads((tmp_path / f"plan-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # rank 0 planned, both got its plan
    cli = _cli_plan(compose_cfg, [*uvm, *TINY, "topology.compute_device=cuda"], tmp_path / "cli")
    assert cli["compute_device"] == "cuda"
    assert cli["plan"] == ranks[0]["plan"]
    tables = cli["plan"][EBC]
    _check_overrides(tables)
    assert {t["compute_kernel"] for t in tables.values()} == {"fused_uvm_caching"}
    assert tables["t_cat_5"]["cache_load_factor"] == 0.35
