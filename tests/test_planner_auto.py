"""``sharding=auto`` on CPU chooses among torchrec's own CPU sharding types.

The row-wise family (row_wise, table_row_wise, grid) runs on CPU through
``sharding.sharders`` but only when a strategy or a table override asks for it.
Planned in this process (``pg=None``) for a 2-rank CPU topology, on a meta model.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sharding.planner import TableOverride, make_topology, plan_sharding
from sharding.sharders import auto_sharding_types, embedding_sharders

ROW_FAMILY = {"row_wise", "table_row_wise", "grid_shard"}


def _plan(strategy: str, overrides: dict[str, TableOverride] | None = None) -> dict[str, str]:
    # The bench's shape, where auto used to put every table row-wise on CPU.
    names = [f"t_cat_{i}" for i in range(6)]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, embedding_dim=16, num_embeddings=100_000, feature_names=[n[2:]]
            )
            for n in names
        ],
        device=torch.device("meta"),
    )
    plan = plan_sharding(
        ebc,
        strategy=strategy,
        topology=make_topology(world_size=2, compute_device="cpu"),
        sharders=embedding_sharders(),
        pg=None,
        batch_size=2048,
        table_names=names,
        overrides=overrides,
    )
    (module_plan,) = plan.plan.values()
    return {name: p.sharding_type for name, p in module_plan.items()}  # type: ignore[union-attr]


def test_auto_on_cpu_offers_torchrec_types_only() -> None:
    assert not ROW_FAMILY & set(auto_sharding_types("cpu"))
    assert ROW_FAMILY <= set(auto_sharding_types("cuda"))


def test_auto_on_cpu_picks_no_row_wise_table() -> None:
    chosen = _plan("auto")
    assert len(chosen) == 6
    assert not ROW_FAMILY & set(chosen.values()), chosen


@pytest.mark.parametrize("strategy", ["row_wise", "table_wise"])
def test_forced_strategy_still_planned_on_cpu(strategy: str) -> None:
    assert set(_plan(strategy).values()) == {strategy}


def test_auto_with_a_row_wise_override() -> None:
    chosen = _plan("auto", {"t_cat_0": TableOverride(strategy="row_wise")})
    assert chosen["t_cat_0"] == "row_wise"
    assert not ROW_FAMILY & {t for n, t in chosen.items() if n != "t_cat_0"}


def test_auto_splits_no_table_narrower_than_a_column_block() -> None:
    # dim 16 <= 128 (torchrec's block): a column split would be one block, i.e.
    # table_wise with extra permutes; the planner tied the three and the pick varied.
    assert set(_plan("auto").values()) == {"table_wise"}
