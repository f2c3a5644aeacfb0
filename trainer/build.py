"""Building the sharded model: steps 4-7 of ``train`` (see trainer/train.py).

Example::

    built = build(cfg, env)       # built.model is a DistributedModelParallel
    print(format_plan(built.plan))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.optim.keyed import CombinedOptimizer

from compression.dense_qat import enable_dense_qat
from compression.grad_scale import enable_loss_scaling
from compression.precision import Precision, resolve_precision
from compression.qat import QATHandle, enable_embedding_qat
from sharding import DistEnv, embedding_sharders, make_topology, plan_sharding, shard_model
from sharding.codecs import comm_codecs
from sharding.dmp import combined_optimizer, fuse_embedding_optimizer
from sharding.planner import TableOverride, pin_ranks
from trainer.config import (
    Config,
    ConfigError,
    TableConfig,
    pooling_factors,
    qat_bits,
    resolved_tables,
)
from trainer.models import build_model
from trainer.validate import validate_for_device


@dataclass
class Built:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: ShardingPlan
    tables: list[TableConfig]
    precision: Precision
    qat: QATHandle | None = None


def build_unsharded(
    cfg: Config, *, device: torch.device, precision: Precision | None = None
) -> torch.nn.Module:
    """The model as configured, on ``device`` (``meta`` before sharding)."""
    m = cfg.model
    return build_model(
        arch=m.arch,
        tables=resolved_tables(cfg),
        num_dense=cfg.data.num_dense,
        dense_arch_layer_sizes=m.dense_arch_layer_sizes,
        over_arch_layer_sizes=m.over_arch_layer_sizes,
        dcn_num_layers=m.dcn_num_layers,
        dcn_low_rank_dim=m.dcn_low_rank_dim,
        device=device,
        table_data_type=precision.table_data_type if precision else DataType.FP32,
    )


def table_overrides(cfg: Config) -> dict[str, TableOverride]:
    return {
        name: TableOverride(
            strategy=pin.strategy,
            compute_kernel=pin.compute_kernel,
            ranks=tuple(pin.ranks) if pin.ranks else None,
        )
        for name, pin in cfg.sharding.tables.items()
    }


def build(cfg: Config, env: DistEnv) -> Built:
    """Meta model -> fused table optimizer -> plan -> DMP -> combined optimizer.

    Under fp16 the combined optimizer is a LossScaledOptimizer (compression/grad_scale.py).
    """
    validate_for_device(cfg, env.device.type)
    try:
        precision = resolve_precision(
            cfg.precision.name,
            device_type=env.device.type,
            fp16_on_cpu=cfg.precision.fp16_on_cpu,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    tables = resolved_tables(cfg)
    model = build_unsharded(cfg, device=torch.device("meta"), precision=precision)
    fuse_embedding_optimizer(
        model.model.sparse_arch.parameters(),
        lr=cfg.optim.embedding_lr,
        eps=cfg.optim.embedding_eps,
    )
    sharders = embedding_sharders(
        fused_params=precision.fused_params or None,
        qcomm_codecs_registry=comm_codecs(
            forward=cfg.sharding.comm_forward,
            backward=cfg.sharding.comm_backward,
            world_size=env.world_size,
            device=env.device,
        ),
    )
    overrides = table_overrides(cfg)
    topo = cfg.topology
    topology = make_topology(
        world_size=env.world_size,
        local_world_size=topo.local_world_size or env.local_world_size,
        compute_device=topo.compute_device or env.device.type,
        hbm_gb=topo.hbm_gb,
        ddr_gb=topo.ddr_gb,
        intra_host_bw_gbps=topo.intra_host_bw_gbps,
        inter_host_bw_gbps=topo.inter_host_bw_gbps,
    )
    plan = plan_sharding(
        model,
        strategy=cfg.sharding.strategy,
        compute_kernel=cfg.sharding.compute_kernel,
        topology=topology,
        sharders=sharders,
        pg=env.pg,
        batch_size=cfg.trainer.batch_size,
        table_names=[t.name for t in tables],
        storage_reservation_percentage=topo.storage_reservation_percentage,
        pooling_factors=pooling_factors(cfg),
        overrides=overrides,
        cache_load_factor=cfg.sharding.cache_load_factor,
        column_shard_dim=cfg.sharding.column_shard_dim,
    )
    plan = pin_ranks(
        plan,
        model,
        overrides=overrides,
        strategy=cfg.sharding.strategy,
        compute_kernel=cfg.sharding.compute_kernel,
        sharder=sharders[0],
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        device_type=env.device.type,
    )
    _refuse_16bit_data_parallel(plan, precision, cfg.optim.dense_optimizer)
    dmp = shard_model(model, plan=plan, env=env, sharders=sharders)
    # Table QAT hooks the sharded kernels, so it is applied after sharding.
    bits = qat_bits(cfg)
    qat = enable_embedding_qat(dmp, bits=bits) if bits else None
    # Dense QAT parametrizes the Linears DDP already holds (the same Parameters, so
    # DDP's gradient hooks still fire); it cannot go on the meta model: torch's fake
    # quantization has no meta kernel, and DMP's reset_parameters would initialize
    # the computed weight instead of the master.
    if cfg.qat.dense_bits:
        enable_dense_qat(dmp)
    optimizer = combined_optimizer(
        dmp,
        dense_optimizer=cfg.optim.dense_optimizer,
        dense_lr=cfg.optim.dense_lr,
        dense_weight_decay=cfg.optim.dense_weight_decay,
    )
    if precision.loss_scaling:  # fp16: the pipeline scales the loss for this optimizer
        optimizer = enable_loss_scaling(
            dmp,
            optimizer,
            device=env.device,
            init_scale=cfg.precision.loss_scale,
            process_group=env.pg,
        )
    return Built(
        model=dmp, optimizer=optimizer, plan=plan, tables=tables, precision=precision, qat=qat
    )


def _refuse_16bit_data_parallel(plan: ShardingPlan, precision: Precision, dense: str) -> None:
    """Data-parallel tables are dense parameters: the dense optimizer updates them in 16 bits.

    Adam's (and Adagrad's) state then lives in fp16/bf16, its eps rounds to 0 and
    the rows turn nan within a few steps (measured on CPU); the fused kernels keep
    their optimizer state in fp32 and round stochastically, the dense path does not.
    Plain SGD has no such state and is allowed.
    """
    if precision.table_data_type == DataType.FP32 or dense == "sgd":
        return
    data_parallel = sorted(
        table
        for module_plan in plan.plan.values()
        for table, ps in module_plan.items()  # type: ignore[union-attr]
        if ps.sharding_type == "data_parallel"
    )
    if data_parallel:
        raise ConfigError(
            f"precision={precision.name} stores tables in 16 bits, but tables {data_parallel} "
            f"are data_parallel, updated by the dense optimizer without stochastic rounding "
            f"with optim.dense_optimizer={dense} (they diverge to nan); shard them "
            f"(e.g. sharding=table_wise, or "
            f"'+sharding.tables={{{data_parallel[0]}:{{strategy:table_wise}}}}') "
            f"or use precision=fp32"
        )
