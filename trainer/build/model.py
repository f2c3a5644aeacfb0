"""Building the sharded model: steps 4-7 of ``train`` (see trainer/train.py).

Example::

    built = build(cfg, env, source=source)   # built.model is a DistributedModelParallel
    print(format_plan(built.plan))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner.types import Stats
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType

from compression.converter import Converters
from sharding import DistEnv, shard_model
from sharding.dmp import combined_optimizer
from trainer.config.schema import Config, TableConfig, resolved_tables
from trainer.build.compression import build_converters, model_tables
from trainer.data.source import DataSource
from trainer.models import build_model
from trainer.plan.run_plan import Planned, World, plan_model
from trainer.config.validate import open_source, validate_for_device


@dataclass
class Built:
    model: DistributedModelParallel
    optimizer: torch.optim.Optimizer
    plan: ShardingPlan
    tables: list[TableConfig]
    converters: Converters


def build_unsharded(
    cfg: Config,
    *,
    device: torch.device,
    tables: Sequence[TableConfig] | None = None,
    num_dense: int | None = None,
    table_data_type: DataType = DataType.FP32,
) -> torch.nn.Module:
    """The model as configured, on ``device`` (``meta`` before sharding).

    ``tables`` / ``num_dense``: from the data source; default: the synthetic
    source's, known from ``cfg.data`` alone.
    """
    if tables is None or num_dense is None:
        tables, num_dense = resolved_tables(cfg, cfg.data.features), cfg.data.num_dense
    m = cfg.model
    return build_model(
        arch=m.arch,
        tables=tables,
        num_dense=num_dense,
        dense_arch_layer_sizes=m.dense_arch_layer_sizes,
        over_arch_layer_sizes=m.over_arch_layer_sizes,
        dcn_num_layers=m.dcn_num_layers,
        dcn_low_rank_dim=m.dcn_low_rank_dim,
        device=device,
        table_data_type=table_data_type,
    )


def plan_meta_model(
    cfg: Config,
    *,
    source: DataSource,
    tables: Sequence[TableConfig],
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
        cfg,
        tables=tables,
        num_dense=source.num_dense,
        device=torch.device("meta"),
        table_data_type=converters.table_data_type(),
    )
    model = converters.wrap_model(model)
    planned = plan_model(
        cfg,
        model=model,
        tables=model_tables(cfg, tables),
        features=source.features,
        converters=converters,
        world=world,
        pg=pg,
        stats=stats,
    )
    return model, planned


def build(cfg: Config, env: DistEnv, *, source: DataSource | None = None) -> Built:
    """Converters -> meta model -> plan -> DMP -> converters on it -> combined optimizer.

    ``source``: the run's data source (default: opened from ``cfg.data``).
    """
    validate_for_device(cfg, env.device.type)
    source = source or open_source(cfg.data, seed=cfg.trainer.seed)
    tables = resolved_tables(cfg, source.features)
    converters = build_converters(cfg, tables=tables, device_type=env.device.type)
    model, planned = plan_meta_model(
        cfg,
        source=source,
        tables=tables,
        converters=converters,
        world=World(
            world_size=env.world_size,
            local_world_size=cfg.topology.local_world_size or env.local_world_size,
            device=torch.device(cfg.topology.compute_device or env.device.type),
        ),
        pg=env.pg,
    )
    dmp = shard_model(model, plan=planned.plan, env=env, sharders=planned.sharders)
    converters.convert_sharded(dmp, device=env.device, process_group=env.pg)
    optimizer = combined_optimizer(
        dmp,
        dense_optimizer=cfg.optim.dense_optimizer,
        dense_lr=cfg.optim.dense_lr,
        dense_weight_decay=cfg.optim.dense_weight_decay,
    )
    optimizer = converters.wrap_optimizer(dmp, optimizer, device=env.device, process_group=env.pg)
    return Built(
        model=dmp, optimizer=optimizer, plan=planned.plan, tables=tables, converters=converters
    )
