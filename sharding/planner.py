"""Sharding plans: torchrec's planner over a topology, or one strategy for all tables.

``auto`` lets torchrec's EmbeddingShardingPlanner choose per table against the
topology's memory and bandwidth model; any other strategy is passed to the same
planner as a per-table constraint, so every plan, chosen or forced, comes out of
one code path and is checked against the memory caps.

Example::

    topology = make_topology(world_size=2, compute_device="cpu")
    plan = plan_sharding(model, strategy="table_wise", topology=topology,
                         sharders=embedding_sharders(), pg=pg, batch_size=512,
                         table_names=["t_cat_0", "t_cat_1"])
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
)
from torchrec.distributed.planner.types import (
    KernelConfig,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

STRATEGIES = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")
_GB = 1024**3


def make_topology(
    *,
    world_size: int,
    compute_device: str,
    local_world_size: int | None = None,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
) -> Topology:
    """A planner topology, built through torchrec's TopologyFactory."""
    trainer_config = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size or world_size,
        hbm_cap_bytes=int(hbm_gb * _GB) if hbm_gb and compute_device != "cpu" else None,
        ddr_cap_bytes=int(ddr_gb * _GB) if ddr_gb else None,
    )
    return TopologyFactory.create_topology(
        trainer_config=trainer_config,
        kernel_config=KernelConfig(compute_device=compute_device),
    )


def _constraints(
    strategy: str, compute_kernel: str, table_names: list[str]
) -> dict[str, ParameterConstraints] | None:
    if strategy == "auto":
        return None
    # Data-parallel tables are plain replicated tensors: only the dense kernel applies.
    kernel = "dense" if strategy == "data_parallel" else compute_kernel
    return {
        name: ParameterConstraints(sharding_types=[strategy], compute_kernels=[kernel])
        for name in table_names
    }


def plan_sharding(
    model: nn.Module,
    *,
    strategy: str,
    topology: Topology,
    sharders: list[ModuleSharder[nn.Module]],
    pg: dist.ProcessGroup | None,
    batch_size: int,
    table_names: list[str],
    compute_kernel: str = "fused",
    storage_reservation_percentage: float = 0.15,
) -> ShardingPlan:
    """Plans on rank 0 and broadcasts, so every rank applies the same plan."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"sharding strategy {strategy!r} is not known; use one of {STRATEGIES}"
        )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=_constraints(strategy, compute_kernel, table_names),
        storage_reservation=FixedPercentageStorageReservation(
            storage_reservation_percentage
        ),
    )
    if pg is None:
        return planner.plan(model, sharders)
    return planner.collective_plan(model, sharders, pg)
