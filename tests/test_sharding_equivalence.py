"""Sharded training equals unsharded training.

Two gloo ranks (four, as 2 hosts x 2 processes, for the hierarchical
strategies) train a tiny DLRM for 5 steps with the tables sharded through the
trainer's own build path and pipeline;
one process trains the same model, from the same weights, on the same global
batches without sharding. Losses and every embedding row must agree.

The reference steps on the global batch's mean loss, tables included: DDP
averages the dense gradients over ranks, and torchrec divides the embedding
gradients that the backward all-to-all (or reduce-scatter) returns to each
shard's owner by the group size (``comm_ops`` gradient division, on by
default), so every sharded gradient is the global-mean loss's. (Row-wise
Adagrad from zero state would not notice a constant factor; the warm-state
case in tests/test_replicas.py does.) Data-parallel tables are replicated dense
parameters: averaged like the dense layers and updated by the dense optimizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from sharding import DistEnv, destroy_distributed, init_distributed
from sharding.planner import sharding_type
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import (
    block_width,
    reference_optimizers,
    reference_step,
    table_parameters,
    unsharded_model,
)
from trainer.config.schema import (
    Config,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    TableShardingConfig,
    TrainConfig,
)
from trainer.data import SyntheticCriteo, SyntheticDataConfig, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.session import build

BATCH_SIZE = 16  # per rank
NUM_STEPS = 5
# float32 with a different reduction order (all-to-all sums, DDP all-reduce):
# losses agree to ~1e-6; rows that moved by ~0.1 agree to ~5e-5 at worst
# (measured), because row-wise Adagrad divides by the root of tiny early
# gradient sums.
LOSS_ATOL = 1e-5
ROW_ATOL = 1e-4


# Mixed plan: pinned ranks, a per-table strategy and kernel, the rest column-wise.
OVERRIDES = {
    "t_cat_0": TableShardingConfig(strategy="table_wise", ranks=[1]),
    "t_cat_1": TableShardingConfig(strategy="row_wise"),
    "t_cat_2": TableShardingConfig(strategy="data_parallel"),
}


def tiny_config(strategy: str, *, overrides: bool = False) -> Config:
    cfg = Config(
        model=ModelConfig(
            embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]
        ),
        data=SyntheticDataConfig(
            num_dense=4,
            cardinalities=[40, 100, 7, 64],
            hotness=[1, 3, 1, 2],
            seed=3,
            num_interactions=3,
        ),
        # Block width 4: the dim-8 tables split into two column blocks (default: 128).
        sharding=ShardingConfig(strategy=strategy, device="cpu", column_shard_dim=4),
        optim=OptimConfig(embedding_lr=0.1, dense_lr=0.01),
        trainer=TrainConfig(batch_size=BATCH_SIZE, num_steps=NUM_STEPS),
    )
    if overrides:
        cfg.sharding.tables = dict(OVERRIDES)
    return cfg


CASES_2 = ["table_wise", "row_wise", "column_wise", "data_parallel", "overrides", "comm_codecs"]
CASES_4 = ["table_row_wise", "table_column_wise", "grid"]


def _case_config(case: str) -> Config:
    if case == "overrides":
        return tiny_config("column_wise", overrides=True)
    if case == "comm_codecs":
        cfg = tiny_config("row_wise")
        cfg.sharding.comm_forward, cfg.sharding.comm_backward = "fp16", "bf16"
        return cfg
    return tiny_config(case)


def _sharded_worker(rank: int, cases: list[str], out_dir: str) -> None:
    """Every case in one process group: process start-up dominates these tiny runs."""
    env = init_distributed(device="cpu")
    try:
        for case in cases:
            _train_case(rank, env, case, Path(out_dir))
    finally:
        destroy_distributed()


def _train_case(rank: int, env: DistEnv, case: str, out_dir: Path) -> None:
    cfg = _case_config(case)
    init_path = out_dir / f"{case}-init.pt"
    built = build(cfg, env)
    load_unsharded(built.model, torch.load(init_path))
    pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
    batches = rank_batches(
        SyntheticCriteo(cfg.data),
        "train",
        batch_size=BATCH_SIZE,
        rank=rank,
        world_size=env.world_size,
        num_batches=NUM_STEPS,
    )
    losses = []
    for loss, _logits, _labels in drain(pipeline, batches):
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / env.world_size)
    plan_types = {
        t: (ps.sharding_type, list(ps.ranks or []))
        for mp in built.plan.plan.values()
        for t, ps in mp.items()
    }
    replicated = {
        k: [((0, 0), v.detach().clone())]
        for k, v in built.model.state_dict().items()
        if "embedding_bags" in k and isinstance(v, torch.Tensor) and type(v) is torch.Tensor
    }
    torch.save(
        {
            "losses": losses,
            "shards": {**replicated, **local_shards(built.model)},
            "plan": plan_types,
        },
        out_dir / f"{case}-rank{rank}.pt",
    )


def _reference(
    cfg: Config, init: dict, world_size: int, plan: dict[str, tuple[str, list[int]]]
) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    named_tables = dict(model.model.sparse_arch.embedding_bag_collection.embedding_bags.items())
    # Data-parallel tables are replicated dense parameters in torchrec: DDP averages
    # their gradients and the dense optimizer (not the fused one) updates them.
    # Column-split tables: one row-wise Adagrad accumulator per column block, as
    # each of their shards keeps (tests/reference.py).
    tables = [
        p
        for n, t in named_tables.items()
        if plan[n][0] != "data_parallel"
        for p in table_parameters(t, width=block_width(plan[n][0], cfg.sharding.column_shard_dim))
    ]
    optimizers = reference_optimizers(model, tables, cfg.optim)
    source = SyntheticCriteo(cfg.data)
    global_batch = BATCH_SIZE * world_size
    losses = []
    for step in range(NUM_STEPS):
        batch = source.batch("train", step * global_batch, global_batch)
        losses.append(reference_step(model, batch, optimizers))
    weights = {k: named_tables[k.split(".")[-2]].weight for k in init if "embedding_bags" in k}
    return losses, {k: w.detach().clone() for k, w in weights.items()}


def _run_cases(out_dir: Path, cases: list[str], *, world_size: int, local_world_size: int) -> Path:
    for case in cases:
        torch.manual_seed(0)
        init = unsharded_model(_case_config(case), device=torch.device("cpu")).state_dict()
        torch.save(init, out_dir / f"{case}-init.pt")
    run_ranks(
        _sharded_worker,
        cases,
        str(out_dir),
        world_size=world_size,
        local_world_size=local_world_size,
    )
    return out_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return _run_cases(tmp_path_factory.mktemp("eq2"), CASES_2, world_size=2, local_world_size=2)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Path:
    """4 ranks as 2 hosts x 2 processes (LOCAL_WORLD_SIZE=2)."""
    return _run_cases(tmp_path_factory.mktemp("eq4"), CASES_4, world_size=4, local_world_size=2)


def _check_equivalence(
    out_dir: Path,
    case: str,
    *,
    world_size: int,
    loss_atol: float = LOSS_ATOL,
    row_atol: float = ROW_ATOL,
) -> dict:
    cfg = _case_config(case)
    init = torch.load(out_dir / f"{case}-init.pt")
    ranks = [torch.load(out_dir / f"{case}-rank{r}.pt") for r in range(world_size)]
    plan = ranks[0]["plan"]
    ref_losses, ref_tables = _reference(cfg, init, world_size, plan)

    # The test means something only if training moved: losses change step to step.
    assert max(ref_losses) - min(ref_losses) > 1e-3
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=loss_atol, rtol=0
    )
    row_diff, row_move = 0.0, 0.0
    for key, ref in ref_tables.items():
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        row_diff = max(row_diff, float((full - ref).abs().max()))
        row_move = max(row_move, float((ref - init[key]).abs().max()))
        assert not torch.isnan(full).any(), f"{key}: shards do not cover the table"
        assert not torch.equal(ref, init[key]), f"{key}: reference rows never moved"
        torch.testing.assert_close(
            full, ref, atol=row_atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )
    plan["_max_loss_diff"] = max(abs(a - b) for a, b in zip(ranks[0]["losses"], ref_losses))
    plan["_max_row_diff"], plan["_max_row_move"] = row_diff, row_move
    return plan


@pytest.mark.dist
@pytest.mark.parametrize("strategy", CASES_2[:4])
def test_sharded_matches_unsharded(strategy: str, two_ranks: Path) -> None:
    plan = _check_equivalence(two_ranks, strategy, world_size=2)
    assert {v[0] for k, v in plan.items() if k.startswith("t_")} == {strategy}
    if strategy == "column_wise":  # every table's columns really are split over the ranks
        assert all(sorted(v[1]) == [0, 1] for k, v in plan.items() if k.startswith("t_"))


@pytest.mark.dist
def test_fp16_bf16_comm_codecs_stay_close(two_ranks: Path) -> None:
    """Forward all-to-all in fp16, backward in bf16: rounded, so close but not equal."""
    # fp16 keeps 11 significant bits: each value sent is off by at most 2**-11 of
    # itself (gloo sends the bf16 backward as fp16 too). Row-wise Adagrad divides
    # the gradient by its own running norm, so a gradient off by a relative 2**-11
    # moves a row by at most ~lr * 2 * 2**-11 more or less per step: over 5 steps
    # at lr 0.1, 4.9e-4 (measured: 2.3e-4, rows moving by up to 0.89). The loss, ~0.7,
    # is off by less than one fp16 ulp of itself, 3.4e-4 (measured: 4.3e-6).
    lr = _case_config("comm_codecs").optim.embedding_lr
    plan = _check_equivalence(
        two_ranks,
        "comm_codecs",
        world_size=2,
        loss_atol=0.7 * 2**-11,
        row_atol=NUM_STEPS * lr * 2 * 2**-11,
    )
    assert plan["_max_loss_diff"] > 1e-7, "the codecs changed nothing: were they attached?"
    assert plan["_max_row_move"] > 100 * plan["_max_row_diff"]


@pytest.mark.dist
@pytest.mark.parametrize("strategy", CASES_4)
def test_hierarchical_on_two_hosts_matches_unsharded(strategy: str, two_hosts: Path) -> None:
    plan = _check_equivalence(two_hosts, strategy, world_size=4)
    assert {v[0] for k, v in plan.items() if k.startswith("t_")} == {sharding_type(strategy)}
    # Two column blocks per table (table_column_wise: on two ranks; grid: each block
    # row-split over one host's two ranks): the split is real, not one block.
    blocks = {"table_row_wise": 2, "table_column_wise": 2, "grid": 4}[strategy]
    assert all(len(set(v[1])) == blocks for k, v in plan.items() if k.startswith("t_"))


@pytest.mark.dist
def test_per_table_overrides_match_unsharded(two_ranks: Path) -> None:
    plan = _check_equivalence(two_ranks, "overrides", world_size=2)
    assert plan["t_cat_0"] == ("table_wise", [1])
    assert plan["t_cat_1"][0] == "row_wise"
    assert plan["t_cat_2"][0] == "data_parallel"
    assert plan["t_cat_3"][0] == "column_wise"
