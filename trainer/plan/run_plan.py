"""One planning path: the trainer and ``python -m trainer.plan`` both call :func:`plan_model`.

Given the meta model, the run's tables (with the source's pooling factors),
the config sections it reads (``sharding``, ``topology``, ``optim``), the
converters (table dtype, fused kernel arguments) and a world to plan for, it
builds the sharders and the planner's topology, applies per-table overrides
(strategy, kernel, UVM cache load factor, pinned ranks), plans, and lets each
converter refuse a plan it cannot train. The running job plans for itself
(``pg`` set: rank 0 plans and broadcasts); the CLI plans for a cluster
that is not there (``pg=None``) with the same inputs.

Example::

    planned = plan_model(meta_model, tables=tables, sharding=cfg.sharding,
                         topology=cfg.topology, optim=cfg.optim, batch_size=1024,
                         converters=converters, world=World(world_size=2, local_world_size=2,
                         device=torch.device("cpu")), pg=env.pg)
    print(format_plan(planned.plan))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner.types import PlannerError, Stats, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compression.converter import Converters
from compression.lowrank_allocate import FractionTooSmall
from sharding import embedding_sharders, make_topology, plan_sharding
from sharding.codecs import comm_codecs
from sharding.collectives import broadcast_object, is_main
from sharding.dmp import fuse_embedding_optimizer
from sharding.fit import explain_no_fit, table_bytes
from sharding.planner import TableOverride, pin_ranks
from trainer.builder.model import build_unsharded
from trainer.config.schema import (
    Config,
    ConfigError,
    OptimConfig,
    ShardingConfig,
    TableConfig,
    TableShardingConfig,
    TopologyConfig,
)
from trainer.config.tables import RunTables


@dataclass(frozen=True)
class World:
    """What the plan is for: the running job, or a cluster given in ``topology.*``."""

    world_size: int
    local_world_size: int
    device: torch.device


@dataclass
class Planned:
    plan: ShardingPlan
    sharders: list[ModuleSharder[nn.Module]]
    topology: Topology


def table_overrides(pins: dict[str, TableShardingConfig]) -> dict[str, TableOverride]:
    """``sharding.tables`` as the planner's per-table overrides."""
    return {
        name: TableOverride(
            strategy=pin.strategy,
            compute_kernel=pin.compute_kernel,
            ranks=tuple(pin.ranks) if pin.ranks else None,
        )
        for name, pin in pins.items()
    }


def plan_model(
    model: nn.Module,
    *,
    tables: RunTables,
    sharding: ShardingConfig,
    topology: TopologyConfig,
    optim: OptimConfig,
    batch_size: int,
    converters: Converters,
    world: World,
    pg: Any,
    stats: list[Stats] | None = None,
) -> Planned:
    """Fused table optimizer on the meta model, sharders, plan (see the module docstring)."""
    # The optimizer's state is part of each table's storage in the planner's estimate.
    collections = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    fuse_embedding_optimizer(
        # Every collection's tables (a distillation pair has two collections).
        [p for ebc in collections for p in ebc.parameters()],
        lr=optim.embedding_lr,
        eps=optim.embedding_eps,
    )
    sharders = embedding_sharders(
        fused_params=converters.fused_params() or None,
        qcomm_codecs_registry=comm_codecs(
            forward=sharding.comm_forward,
            backward=sharding.comm_backward,
            world_size=world.world_size,
            device=world.device,
        ),
    )
    overrides = table_overrides(sharding.tables)
    topo, s = topology, sharding
    planner_topology = make_topology(
        world_size=world.world_size,
        local_world_size=world.local_world_size,
        compute_device=world.device.type,
        hbm_gb=topo.hbm_gb,
        ddr_gb=topo.ddr_gb,
        intra_host_bw_gbps=topo.intra_host_bw_gbps,
        inter_host_bw_gbps=topo.inter_host_bw_gbps,
    )

    def plan_here() -> ShardingPlan:
        return plan_sharding(
            model,
            strategy=s.strategy,
            compute_kernel=s.compute_kernel,
            topology=planner_topology,
            sharders=sharders,
            pg=None,
            batch_size=batch_size,
            table_names=[t.name for t in tables.trained],
            storage_reservation_percentage=topo.storage_reservation_percentage,
            pooling_factors=tables.pooling_factors(),
            overrides=overrides,
            cache_load_factor=s.cache_load_factor,
            column_shard_dim=s.column_shard_dim,
            stats=stats,
        )

    plan = (
        plan_here()
        if pg is None
        else _plan_on_rank0(plan_here, tables.trained, world, sharding=s, topology=topo)
    )
    plan = pin_ranks(
        plan,
        model,
        overrides=overrides,
        strategy=s.strategy,
        compute_kernel=s.compute_kernel,
        sharder=sharders[0],
        world_size=world.world_size,
        local_world_size=world.local_world_size,
        device_type=world.device.type,
    )
    try:
        converters.check_plan(plan)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return Planned(plan=plan, sharders=sharders, topology=planner_topology)


def plan_meta_model(
    cfg: Config,
    *,
    tables: RunTables,
    num_dense: int,
    converters: Converters,
    world: World,
    pg: Any,
    stats: list[Stats] | None = None,
) -> tuple[torch.nn.Module, Planned]:
    """The model on ``meta`` and its plan: what the trainer and ``python -m trainer.plan``
    both do (``pg=None``: plan in this process, for a world that need not exist).

    Tables take the converters' dtype; what a converter wraps around the model (a
    distillation student) is built before planning, so it is planned and sharded with it.
    """
    model = build_unsharded(
        cfg.model,
        tables=tables,
        num_dense=num_dense,
        device=torch.device("meta"),
        table_data_type=converters.table_data_type(),
    )
    try:
        model = converters.wrap_model(model)
    except FractionTooSmall as err:  # the fraction the model's layer shapes need
        raise ConfigError(str(err)) from None
    planned = plan_model(
        model,
        tables=tables,
        sharding=cfg.sharding,
        topology=cfg.topology,
        optim=cfg.optim,
        batch_size=cfg.trainer.batch_size,
        converters=converters,
        world=world,
        pg=pg,
        stats=stats,
    )
    return model, planned


def _plan_on_rank0(
    plan_here: Callable[[], ShardingPlan],
    tables: Sequence[TableConfig],
    world: World,
    *,
    sharding: ShardingConfig,
    topology: TopologyConfig,
) -> ShardingPlan:
    """Rank 0 plans; every rank gets its plan or its error. (torchrec's collective_plan
    leaves the other ranks waiting on a broadcast that never comes when rank 0 fails.)"""
    plan, error, failed = None, None, None
    if is_main():
        try:
            plan = plan_here()
        except PlannerError as err:
            error = no_fit_message(
                tables, world, sharding=sharding, topology=topology, planner_error=err
            )
        except Exception as err:
            failed = f"{type(err).__name__}: {err}"
            broadcast_object((None, None, failed))
            raise
    plan, error, failed = broadcast_object((plan, error, failed))
    if error is not None:
        raise ConfigError(f"no sharding plan fits this job: {error}")
    if failed is not None:
        raise RuntimeError(f"planning failed on rank 0: {failed}")
    return plan


def no_fit_message(
    tables: Sequence[TableConfig],
    world: World,
    *,
    sharding: ShardingConfig,
    topology: TopologyConfig,
    planner_error: PlannerError,
) -> str:
    """Why no plan fits: the tables' bytes against the devices' memory, and the fix."""
    return explain_no_fit(
        [
            table_bytes(t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim)
            for t in tables
        ],
        strategy=sharding.strategy,
        world_size=world.world_size,
        compute_device=world.device.type,
        hbm_gb=topology.hbm_gb,
        ddr_gb=topology.ddr_gb,
        storage_reservation_percentage=topology.storage_reservation_percentage,
        planner_message=str(planner_error),
    )
