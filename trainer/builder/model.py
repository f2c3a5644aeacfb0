"""Building the sharded model: steps 4-7 of ``train`` (see trainer/train.py).

Example::

    built = build(cfg, env, source=source)   # built.model is a DistributedModelParallel
    print(format_plan(built.plan))
"""

from __future__ import annotations

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
from trainer.builder.compression import build_converters
from trainer.config.schema import Config, ModelConfig
from trainer.config.tables import RunTables, run_tables
from trainer.config.validate import open_source, validate_for_device
from trainer.data.source import DataSource
from trainer.models import build_model
from trainer.plan.run_plan import Planned, World, plan_model


@dataclass
class Built:
    model: DistributedModelParallel
    optimizer: torch.optim.Optimizer
    plan: ShardingPlan
    tables: RunTables
    converters: Converters


def build_unsharded(
    model: ModelConfig,
    *,
    tables: RunTables,
    num_dense: int,
    device: torch.device,
    table_data_type: DataType = DataType.FP32,
) -> torch.nn.Module:
    """The model as configured over the run's tables, on ``device`` (``meta`` before sharding)."""
    return build_model(
        arch=model.arch,
        tables=tables.model,
        num_dense=num_dense,
        dense_arch_layer_sizes=model.dense_arch_layer_sizes,
        over_arch_layer_sizes=model.over_arch_layer_sizes,
        dcn_num_layers=model.dcn_num_layers,
        dcn_low_rank_dim=model.dcn_low_rank_dim,
        device=device,
        table_data_type=table_data_type,
    )


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
    model = converters.wrap_model(model)
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


def build(cfg: Config, env: DistEnv, *, source: DataSource | None = None) -> Built:
    """Converters -> meta model -> plan -> DMP -> converters on it -> combined optimizer.

    ``source``: the run's data source (default: opened from ``cfg.data``).
    """
    validate_for_device(cfg, env.device.type)
    source = source or open_source(cfg.data, seed=cfg.trainer.seed)
    tables = run_tables(cfg, features=source.features)
    converters = build_converters(cfg, tables=tables, device_type=env.device.type)
    model, planned = plan_meta_model(
        cfg,
        tables=tables,
        num_dense=source.num_dense,
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
