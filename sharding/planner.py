"""Sharding plans: torchrec's planner over a topology, or one strategy for all tables.

``auto`` lets torchrec's EmbeddingShardingPlanner choose per table against the
topology's memory and bandwidth model, among the sharding types torchrec itself
offers on the compute device, less data_parallel (on CPU: table_wise,
column_wise, table_column_wise; row_wise, table_row_wise, grid and
data_parallel only when asked for), and no column split for a table no wider
than one column block (``sharding.column_shard_dim``, torchrec's 128 by default);
any other strategy is passed to the same planner as a per-table constraint,
so every plan, chosen or forced, comes out of one code path and is checked
against the memory caps.

Pooling factors (the mean ids per sample of each feature) feed the planner's
cost and buffer estimates; without them torchrec assumes one id per sample.

Example::

    topology = make_topology(world_size=2, compute_device="cpu")
    plan = plan_sharding(model, strategy="table_wise", topology=topology,
                         sharders=embedding_sharders(), pg=pg, batch_size=512,
                         table_names=["t_cat_0", "t_cat_1"])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.constants import MIN_CW_DIM
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
)
from torchrec.distributed.planner.types import (
    CacheParams,
    HardwareConfig,
    KernelConfig,
    Stats,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    table_wise,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sharding.sharders import auto_sharding_types
from sharding.strategies import STRATEGIES

# Config names that differ from torchrec's ShardingType values.
_SHARDING_TYPES = {"grid": "grid_shard"}


def sharding_type(strategy: str) -> str:
    """torchrec's ShardingType value for a config strategy name."""
    return _SHARDING_TYPES.get(strategy, strategy)


@dataclass(frozen=True)
class TableOverride:
    """One table pinned by hand: its strategy, kernel and (optionally) ranks."""

    strategy: str | None = None
    compute_kernel: str | None = None
    ranks: tuple[int, ...] | None = None


_GB = 1024**3


def _bytes_per_ms(gb_per_s: float | None) -> float | None:
    # torchrec's bandwidth unit; its own defaults are written as GB/s * 1024**3 / 1000.
    return None if gb_per_s is None else gb_per_s * _GB / 1000


def make_topology(
    *,
    world_size: int,
    compute_device: str,
    local_world_size: int | None = None,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    intra_host_bw_gbps: float | None = None,
    inter_host_bw_gbps: float | None = None,
) -> Topology:
    """A planner topology, built through torchrec's TopologyFactory.

    Bandwidths are in GB/s (gigabytes, 1024**3 bytes) per device; None keeps
    torchrec's defaults (600 within a host, 12.5 across hosts).
    """
    trainer_config = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size or world_size,
        hbm_cap_bytes=int(hbm_gb * _GB) if hbm_gb and compute_device != "cpu" else None,
        ddr_cap_bytes=int(ddr_gb * _GB) if ddr_gb else None,
    )
    # torchrec reads HardwareConfig bandwidths only when the kernel config asks
    # for them; an unset one falls back to torchrec's default.
    custom_bw = intra_host_bw_gbps is not None or inter_host_bw_gbps is not None
    return TopologyFactory.create_topology(
        trainer_config=trainer_config,
        hardware_config=HardwareConfig(
            intra_host_bw=_bytes_per_ms(intra_host_bw_gbps),
            inter_host_bw=_bytes_per_ms(inter_host_bw_gbps),
        ),
        kernel_config=KernelConfig(
            compute_device=compute_device, use_hardware_based_bandwidth=custom_bw
        ),
    )


# Column-split types; a table no wider than one block is one column shard.
_COLUMN_SPLIT = ("column_wise", "table_column_wise")


def _one_block(dim: int | None, column_shard_dim: int | None) -> bool:
    return dim is not None and dim <= (column_shard_dim or MIN_CW_DIM)


def _kernels_for(
    strategy: str, compute_kernel: str, compute_device: str, *, one_block: bool = False
) -> tuple[list[str], list[str]]:
    # auto: the planner picks the strategy among those torchrec itself offers on
    # the device, less data_parallel (the CPU extras of sharding.sharders only
    # when asked for: the cost model ranks row-wise first on CPU, where it is the
    # slower one), with the configured kernel only: on CUDA torchrec would
    # otherwise also try UVM, SSD and key-value kernels that move tables off the
    # device, and the dense kernel moves a table to the dense optimizer.
    # A single strategy: data-parallel tables are plain replicated tensors, so
    # only the dense kernel applies.
    # A table no wider than one column block gets no column split under auto: it
    # would be table_wise with extra permutes of its pooled output (and the cost
    # model ties it with table_wise, so the pick varied from run to run).
    if strategy == "auto":
        types = auto_sharding_types(compute_device)
        if one_block:
            types = [t for t in types if t not in _COLUMN_SPLIT]
        return types, [compute_kernel]
    if strategy == "data_parallel":
        return [strategy], ["dense"]
    return [sharding_type(strategy)], [compute_kernel]


def _constraints(
    strategy: str,
    compute_kernel: str,
    table_names: list[str],
    pooling_factors: dict[str, list[float]],
    overrides: dict[str, TableOverride],
    cache_load_factor: float,
    column_shard_dim: int | None = None,
    compute_device: str = "cpu",
    table_dims: dict[str, int] | None = None,
) -> dict[str, ParameterConstraints]:
    constraints = {}
    for name in table_names:
        pin = overrides.get(name, TableOverride())
        sharding_types, kernels = _kernels_for(
            pin.strategy or strategy,
            pin.compute_kernel or compute_kernel,
            compute_device,
            one_block=_one_block((table_dims or {}).get(name), column_shard_dim),
        )
        extra: dict = {"pooling_factors": pooling_factors[name]} if name in pooling_factors else {}
        if "fused_uvm_caching" in kernels:
            extra["cache_params"] = CacheParams(load_factor=cache_load_factor)
        if column_shard_dim:  # column_wise / table_column_wise / grid block width
            extra["min_partition"] = column_shard_dim
        constraints[name] = ParameterConstraints(
            sharding_types=sharding_types, compute_kernels=kernels, **extra
        )
    return constraints


def _pinned(pin: TableOverride, strategy: str, compute_kernel: str) -> ParameterShardingGenerator:
    """torchrec's explicit per-table plan for a table whose ranks are given."""
    strategy = pin.strategy or strategy
    kernel = pin.compute_kernel or compute_kernel
    ranks = list(pin.ranks or ())
    if strategy == "table_wise":
        if len(ranks) != 1:
            raise ValueError(f"a table_wise table lives on one rank; got ranks={ranks}")
        return table_wise(rank=ranks[0], compute_kernel=kernel)
    if strategy == "column_wise":
        return column_wise(ranks=ranks, compute_kernel=kernel)
    raise ValueError(
        f"ranks can be pinned for table_wise and column_wise tables, not {strategy!r}; "
        f"drop ranks or set the table's strategy"
    )


def pin_ranks(
    plan: ShardingPlan,
    model: nn.Module,
    *,
    overrides: dict[str, TableOverride],
    strategy: str,
    compute_kernel: str,
    sharder: ModuleSharder[nn.Module],
    world_size: int,
    local_world_size: int,
    device_type: str,
) -> ShardingPlan:
    """Replaces the planner's choice for tables with pinned ranks by an explicit plan."""
    pinned = {name: pin for name, pin in overrides.items() if pin.ranks}
    if not pinned:
        return plan
    for path, module in model.named_modules():
        if path not in plan.plan:
            continue
        own = {n: p for n, p in pinned.items() if n in plan.plan[path]}
        if not own:
            continue
        # torchrec wants a generator for every table: keep the planner's for the rest.
        per_param: dict[str, ParameterShardingGenerator] = {
            name: (lambda *_, chosen=chosen: chosen)
            for name, chosen in plan.plan[path].items()  # type: ignore[union-attr]
        }
        per_param.update({n: _pinned(p, strategy, compute_kernel) for n, p in own.items()})
        explicit = construct_module_sharding_plan(
            module,
            per_param_sharding=per_param,
            sharder=sharder,
            local_size=local_world_size,
            world_size=world_size,
            device_type=device_type,
        )
        plan.plan[path].update(explicit)  # type: ignore[union-attr]
    return plan


def _table_dims(model: nn.Module) -> dict[str, int]:
    """Each embedding table's dim, by table name, from the model's collections."""
    return {
        config.name: config.embedding_dim
        for module in model.modules()
        if isinstance(module, EmbeddingBagCollection)
        for config in module.embedding_bag_configs()
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
    pooling_factors: dict[str, list[float]] | None = None,
    overrides: dict[str, TableOverride] | None = None,
    cache_load_factor: float = 0.2,
    column_shard_dim: int | None = None,
    stats: list[Stats] | None = None,
) -> ShardingPlan:
    """Plans on rank 0 and broadcasts, so every rank applies the same plan.

    With ``pg=None`` it plans in this process alone, for a topology that need
    not exist (``python -m sharding.plan``). ``overrides`` pins a table's
    strategy or kernel (as planner constraints); pinned ranks are applied by
    :func:`pin_ranks`. ``pooling_factors`` maps a table to the mean ids per
    sample of each of its features; ``stats`` replaces
    torchrec's logged report (e.g. to keep the chosen options, see
    ``sharding.estimate.PlanCapture``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding strategy {strategy!r} is not known; use one of {STRATEGIES}")
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=_constraints(
            strategy,
            compute_kernel,
            table_names,
            pooling_factors or {},
            overrides or {},
            cache_load_factor,
            column_shard_dim,
            topology.compute_device,
            _table_dims(model),
        ),
        storage_reservation=FixedPercentageStorageReservation(storage_reservation_percentage),
        stats=stats,
    )
    if pg is None:
        return planner.plan(model, sharders)
    return planner.collective_plan(model, sharders, pg)
