"""Validation: the checks a schema cannot express, in one place.

Everything here raises :class:`trainer.config.ConfigError` with a message that
names the key and the fix. :func:`validate` runs before any process talks to
another; :func:`validate_for_device` once the rank knows its device.

Example::

    validate(cfg, world_size=2, local_world_size=2)
"""

from __future__ import annotations

from pathlib import Path

from sharding.planner import HIERARCHICAL
from trainer.checkpoint import is_complete, missing_message
from trainer.config import (
    ARCHS,
    COMM_PRECISIONS,
    COMPUTE_KERNELS,
    DENSE_OPTIMIZERS,
    PIPELINES,
    POOLINGS,
    STRATEGIES,
    Config,
    ConfigError,
    feature_names,
    qat_bits,
    resolved_tables,
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(
        value in allowed,
        f"{key}={value!r} is not known; use one of {', '.join(allowed)}",
    )


def _positive(key: str, value: float) -> None:
    _check(value > 0, f"{key}={value} must be positive")


def validate_for_device(cfg: Config, device_type: str) -> None:
    """What depends on the device this rank got (known only after start-up)."""
    kernels = {cfg.sharding.compute_kernel} | {
        p.compute_kernel for p in cfg.sharding.tables.values() if p.compute_kernel
    }
    if "fused_uvm_caching" in kernels and device_type != "cuda":
        raise ConfigError(
            "sharding.compute_kernel=fused_uvm_caching keeps tables in host memory with an "
            f"HBM cache, which needs CUDA; this run is on {device_type}. Use "
            "sharding.compute_kernel=fused (tables in host memory already on CPU)"
        )


def validate(cfg: Config, *, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Checks cross-field constraints; raises ConfigError naming the key and the fix."""
    m, d, s, o, t = cfg.model, cfg.data, cfg.sharding, cfg.optim, cfg.trainer
    _one_of("model.arch", m.arch, ARCHS)
    _one_of("model.pooling", m.pooling, POOLINGS)
    _one_of("sharding.strategy", s.strategy, STRATEGIES)
    _one_of("sharding.compute_kernel", s.compute_kernel, COMPUTE_KERNELS)
    _one_of("sharding.device", s.device, ("auto", "cpu", "cuda"))
    _one_of("sharding.comm_forward", s.comm_forward, COMM_PRECISIONS)
    _one_of("sharding.comm_backward", s.comm_backward, COMM_PRECISIONS)
    _check(
        0 < s.cache_load_factor <= 1,
        f"sharding.cache_load_factor={s.cache_load_factor} must be in (0, 1]",
    )
    _one_of("optim.dense_optimizer", o.dense_optimizer, DENSE_OPTIMIZERS)
    _one_of("trainer.pipeline", t.pipeline, PIPELINES)
    _one_of("precision", cfg.precision.name, ("fp32", "bf16", "fp16"))
    _positive("precision.loss_scale", cfg.precision.loss_scale)
    _check(
        t.export_bits in (2, 4, 8),
        f"trainer.export_bits={t.export_bits}: use 8 or 4 (2 also works)",
    )
    _validate_checkpoints(cfg)
    for key, value in [
        ("model.embedding_dim", m.embedding_dim),
        ("data.num_dense", d.num_dense),
        ("trainer.num_steps", t.num_steps),
        ("trainer.batch_size", t.batch_size),
        ("trainer.eval_every_steps", t.eval_every_steps),
        ("trainer.eval_batch_size", t.eval_batch_size),
        ("trainer.num_threads", t.num_threads if t.num_threads is not None else 1),
        ("optim.embedding_lr", o.embedding_lr),
        ("optim.dense_lr", o.dense_lr),
    ]:
        _positive(key, value)
    for key, sizes in [
        ("model.dense_arch_layer_sizes", m.dense_arch_layer_sizes),
        ("model.over_arch_layer_sizes", m.over_arch_layer_sizes),
    ]:
        _check(len(sizes) > 0, f"{key} is empty; give at least one layer size")
        for i, size in enumerate(sizes):
            _positive(f"{key}[{i}]", size)
    _check(
        len(m.over_arch_layer_sizes) >= 2,
        f"model.over_arch_layer_sizes={list(m.over_arch_layer_sizes)} needs at least two "
        f"layers (torchrec's OverArch); e.g. model.over_arch_layer_sizes=[64,1]",
    )
    _check(
        m.over_arch_layer_sizes[-1] == 1,
        f"model.over_arch_layer_sizes must end in 1 (one click logit), got "
        f"{list(m.over_arch_layer_sizes)}; e.g. model.over_arch_layer_sizes=[64,32,1]",
    )
    _check(len(d.cardinalities) > 0, "data.cardinalities is empty; give one per feature")
    for i, rows in enumerate(d.cardinalities):
        _positive(f"data.cardinalities[{i}]", rows)
    _validate_tables(cfg)
    if m.arch == "dlrm_dcnv2":
        _positive("model.dcn_num_layers", m.dcn_num_layers)
        _positive("model.dcn_low_rank_dim", m.dcn_low_rank_dim)
    _validate_sharding(cfg, world_size, local_world_size or world_size)
    _validate_qat(cfg)
    if s.strategy in ("row_wise", "column_wise") and world_size < 2:
        raise ConfigError(
            f"sharding.strategy={s.strategy} splits tables across ranks and needs "
            f"world_size > 1 (got {world_size}); launch with "
            f"`torchrun --nproc_per_node=2 -m trainer sharding={s.strategy}`"
        )
    if s.column_shard_dim is not None:
        _check(
            s.column_shard_dim > 0 and s.column_shard_dim % 4 == 0,
            f"sharding.column_shard_dim={s.column_shard_dim}: use a positive multiple of 4 "
            f"(FBGEMM's row alignment), or null for torchrec's default (128)",
        )
        for table in resolved_tables(cfg):
            _check(
                table.embedding_dim % s.column_shard_dim == 0,
                f"sharding.column_shard_dim={s.column_shard_dim} does not divide table "
                f"{table.name!r} (dim {table.embedding_dim}) into equal column blocks; "
                f"pick a divisor of model.embedding_dim",
            )
    topo = cfg.topology
    for key, value in [
        ("topology.world_size", topo.world_size),
        ("topology.local_world_size", topo.local_world_size),
    ]:
        if value is not None:
            _positive(key, value)
    _positive("topology.hbm_gb", topo.hbm_gb)
    _positive("topology.ddr_gb", topo.ddr_gb)
    if topo.compute_device is not None:
        _one_of("topology.compute_device", topo.compute_device, ("cuda", "cpu"))
    if topo.world_size is not None and topo.world_size != world_size:
        raise ConfigError(
            f"topology.world_size={topo.world_size} but this job has {world_size} "
            f"process(es); the trainer plans for the job it runs (drop the override), "
            f"`python -m sharding.plan` plans for clusters you do not have"
        )


def _validate_checkpoints(cfg: Config) -> None:
    t = cfg.trainer
    _check(
        t.checkpoint_every_steps >= 0,
        f"trainer.checkpoint_every_steps={t.checkpoint_every_steps} must be >= 0 "
        f"(0 turns checkpoints off)",
    )
    _check(
        t.checkpoint_keep >= 1,
        f"trainer.checkpoint_keep={t.checkpoint_keep} must be at least 1 "
        f"(to keep none, set trainer.checkpoint_every_steps=0)",
    )
    if t.resume not in (None, "auto"):
        _check(is_complete(Path(t.resume)), missing_message(Path(t.resume), key="trainer.resume"))


def _validate_sharding(cfg: Config, world_size: int, env_local_world_size: int) -> None:
    s = cfg.sharding
    names = [t.name for t in resolved_tables(cfg)]
    for name, pin in s.tables.items():
        key = f"sharding.tables.{name}"
        _check(name in names, f"{key}: no such table; tables are {names[0]}..{names[-1]}")
        if pin.strategy is not None:
            _one_of(f"{key}.strategy", pin.strategy, STRATEGIES[1:])
        if pin.compute_kernel is not None:
            _one_of(f"{key}.compute_kernel", pin.compute_kernel, COMPUTE_KERNELS)
        for r in pin.ranks or []:
            _check(0 <= r < world_size, f"{key}.ranks has {r}, outside 0..{world_size - 1}")
    local = cfg.topology.local_world_size or env_local_world_size
    used = {s.strategy} | {p.strategy for p in s.tables.values() if p.strategy}
    for strategy in sorted(used & set(HIERARCHICAL)):
        _check(
            local < world_size and world_size % local == 0,
            f"sharding {strategy} splits tables within a host and across hosts, so it needs "
            f"several hosts: local world size {local} must divide world size {world_size} "
            f"and be smaller; on one machine, emulate hosts with e.g. "
            f"`torchrun --nproc_per_node=4 -m trainer sharding={strategy} "
            f"topology.local_world_size=2`",
        )


def _validate_tables(cfg: Config) -> None:
    tables = resolved_tables(cfg)
    names = [t.name for t in tables]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"model.tables: table names must be unique, repeated: {dupes}")
    features = [f for t in tables for f in t.feature_names]
    dupes = sorted({f for f in features if features.count(f) > 1})
    _check(
        not dupes,
        f"model.tables: each feature feeds one table, but {dupes} appear in several",
    )
    data_features = feature_names(cfg.data)
    missing = [f for f in data_features if f not in features]
    unknown = [f for f in features if f not in data_features]
    _check(
        not unknown,
        f"model.tables names features the data does not have: {unknown}; "
        f"the data has {data_features[0]}..{data_features[-1]}",
    )
    _check(
        not missing,
        f"model.tables leaves data features without a table: {missing}; "
        f"add them to a table's feature_names",
    )
    rows_needed = dict(zip(data_features, cfg.data.cardinalities))
    for i, t in enumerate(tables):
        key = f"model.tables[{i}]" if cfg.model.tables else f"table {t.name}"
        _check(bool(t.feature_names), f"{key}.feature_names is empty")
        _positive(f"{key}.num_embeddings", t.num_embeddings)
        _positive(f"{key}.embedding_dim", t.embedding_dim)
        _one_of(f"{key}.pooling", t.pooling, POOLINGS)
        needed = max(rows_needed[f] for f in t.feature_names)
        _check(
            t.num_embeddings >= needed,
            f"{key}.num_embeddings={t.num_embeddings} is smaller than the "
            f"cardinality {needed} of its features; ids would index past the table",
        )
    # DLRM's dot interaction (and DLRM-DCN's cross layers, as torchrec builds them)
    # stack the dense projection with every pooled embedding, so dims must agree.
    bottom = cfg.model.dense_arch_layer_sizes[-1]
    for t in tables:
        _check(
            t.embedding_dim == bottom,
            f"table {t.name!r} has embedding_dim={t.embedding_dim} but the "
            f"interaction needs it equal to the last bottom-MLP size "
            f"model.dense_arch_layer_sizes[-1]={bottom}; set them equal",
        )


def _validate_qat(cfg: Config) -> None:
    names = [t.name for t in resolved_tables(cfg)]
    for key, b in [("qat.bits", cfg.qat.bits)] + [
        (f"qat.table_bits.{n}", b) for n, b in cfg.qat.table_bits.items()
    ]:
        _check(b in (0, 2, 4, 8), f"{key}={b}: use 8 or 4 (2 also works), or 0 for off")
    for name in cfg.qat.table_bits:
        _check(name in names, f"qat.table_bits.{name}: no such table")
    _check(
        cfg.qat.dense_bits in (0, 8),
        f"qat.dense_bits={cfg.qat.dense_bits}: the dense layers train against int8 weights "
        f"only; use qat.dense_bits=8, or 0 for off",
    )
    quantized = qat_bits(cfg)
    if not quantized:
        return
    _check(
        cfg.precision.name == "fp32",
        f"qat with precision={cfg.precision.name}: 16-bit tables would round the "
        f"fake-quantized rows again; use precision=fp32 (dense autocast is a later step)",
    )
    kernel = cfg.sharding.compute_kernel
    _check(
        kernel != "fused_uvm_caching",
        "qat with sharding.compute_kernel=fused_uvm_caching: writes would miss the HBM "
        "cache; use sharding.compute_kernel=fused",
    )
