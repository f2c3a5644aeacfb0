"""Validation: the checks a schema cannot express, in one place.

Everything here raises :class:`trainer.config.ConfigError` with a message that
names the key and the fix. :func:`open_source` checks the ``data=`` settings and
opens the source (its features give the tables); :func:`validate` then checks
the rest, before any process talks to another; :func:`validate_for_device`
once the rank knows its device. Choices (strategy, kernel, precision, logger,
...) are enums in the schema (trainer/config/schema.py), so a typo fails at compose.

Example::

    source = open_source(cfg.data)
    validate(cfg, features=source.features, world_size=2, local_world_size=2)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharding.planner import HIERARCHICAL
from trainer.build.compression import model_tables
from trainer.checkpoint.load import is_complete, missing_message
from trainer.config.schema import (
    STRATEGIES,
    Config,
    ConfigError,
    qat_bits,
    resolved_tables,
)
from trainer.data import DataSource, make_source
from trainer.data.source import FeatureSpec
from trainer.data.synthetic_config import MAX_CARDINALITY, SyntheticDataConfig
from trainer.report.logger import _has_wandb_credentials, wandb_mode


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(key: str, value: float) -> None:
    _check(value > 0, f"{key}={value} must be positive")


def _layer_sizes(key: str, sizes: Sequence[int]) -> None:
    _check(len(sizes) > 0, f"{key} is empty; give at least one layer size")
    for i, size in enumerate(sizes):
        _positive(f"{key}[{i}]", size)


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


def open_source(data: Any, *, seed: int | None = None) -> DataSource:
    """Checks the ``data=`` settings and opens the source; errors name the key or file.

    ``seed``: ``trainer.seed``, for sources that shuffle (see ``make_source``).
    """
    if isinstance(data, SyntheticDataConfig):
        validate_synthetic(data)
    try:
        return make_source(data, seed=seed)
    except (ValueError, FileNotFoundError) as err:  # e.g. shards missing or of another prepare
        raise ConfigError(str(err)) from err


def validate_synthetic(d: SyntheticDataConfig) -> None:
    """``data=synthetic``: what the planted model needs."""
    _check(d.num_dense >= 0, f"data.num_dense={d.num_dense} must be >= 0")
    _check(
        len(d.cardinalities) > 0,
        "data.cardinalities is empty; give one row count per categorical feature",
    )
    bad = [c for c in d.cardinalities if not 1 <= c < MAX_CARDINALITY]
    _check(not bad, f"data.cardinalities has {bad}; every table needs 1 <= rows < 2**31")
    _check(
        len(d.hotness) in (1, len(d.cardinalities)),
        f"data.hotness has {len(d.hotness)} values for {len(d.cardinalities)} features; "
        "give one value for all features or one per feature",
    )
    _check(min(d.hotness) >= 1, f"data.hotness={list(d.hotness)} must be >= 1 everywhere")
    _check(
        d.zipf_exponent >= 0, f"data.zipf_exponent={d.zipf_exponent} must be >= 0 (0 is uniform)"
    )
    _check(d.num_eval_samples >= 1, f"data.num_eval_samples={d.num_eval_samples} must be >= 1")
    _check(d.num_interactions >= 0, f"data.num_interactions={d.num_interactions} must be >= 0")
    _check(d.latent_dim >= 1, f"data.latent_dim={d.latent_dim} must be >= 1")


def validate(
    cfg: Config,
    *,
    features: Sequence[FeatureSpec] | None = None,
    world_size: int = 1,
    local_world_size: int | None = None,
) -> None:
    """Checks cross-field constraints; raises ConfigError naming the key and the fix.

    ``features``: the data source's (default: the synthetic source's, from its config).
    """
    if features is None:
        validate_synthetic(cfg.data)
        features = cfg.data.features
    m, s, o, t = cfg.model, cfg.sharding, cfg.optim, cfg.trainer
    _check(
        0 < s.cache_load_factor <= 1,
        f"sharding.cache_load_factor={s.cache_load_factor} must be in (0, 1]",
    )
    _positive("precision.loss_scale", cfg.precision.loss_scale)
    _check(
        t.export_bits in (2, 4, 8),
        f"trainer.export_bits={t.export_bits}: use 8 or 4 (2 also works)",
    )
    _validate_checkpoints(cfg)
    for key, value in [
        ("model.embedding_dim", m.embedding_dim),
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
        _layer_sizes(key, sizes)
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
    _validate_tables(cfg, features)
    if m.arch == "dlrm_dcnv2":
        _positive("model.dcn_num_layers", m.dcn_num_layers)
        _positive("model.dcn_low_rank_dim", m.dcn_low_rank_dim)
    _validate_distill(cfg)
    _validate_prune(cfg)
    # With distill=online, the student's own tables too (s_t_cat_0, ...).
    tables = model_tables(cfg, resolved_tables(cfg, features))
    _validate_sharding(cfg, tables, world_size, local_world_size or world_size)
    _validate_qat(cfg, tables)
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
        for table in tables:
            _check(
                table.embedding_dim % s.column_shard_dim == 0,
                f"sharding.column_shard_dim={s.column_shard_dim} does not divide table "
                f"{table.name!r} (dim {table.embedding_dim}) into equal column blocks; "
                f"pick a divisor of model.embedding_dim",
            )
    if cfg.logger.name == "wandb" and wandb_mode(cfg.logger.mode) == "online":
        _check(
            _has_wandb_credentials(),
            f"logger.mode={cfg.logger.mode} (online) needs wandb credentials: set "
            f"WANDB_API_KEY (or run `wandb login` once), or use logger.mode=offline and "
            f"upload later with `wandb sync <run_dir>/wandb/offline-run-*`",
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
    if topo.world_size is not None and topo.world_size != world_size:
        raise ConfigError(
            f"topology.world_size={topo.world_size} but this job has {world_size} "
            f"process(es); the trainer plans for the job it runs (drop the override), "
            f"`python -m trainer.plan` plans for clusters you do not have"
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


def _validate_sharding(
    cfg: Config, tables: Sequence[Any], world_size: int, env_local_world_size: int
) -> None:
    s = cfg.sharding
    names = [t.name for t in tables]
    for name, pin in s.tables.items():
        key = f"sharding.tables.{name}"
        _check(name in names, f"{key}: no such table; tables are {names[0]}..{names[-1]}")
        _check(
            pin.strategy != "auto",
            f"{key}.strategy=auto: pin a strategy ({', '.join(STRATEGIES[1:])}) or drop the key",
        )
        for r in pin.ranks or []:
            _check(0 <= r < world_size, f"{key}.ranks has {r}, outside 0..{world_size - 1}")
        if pin.ranks:
            strategy = pin.strategy or s.strategy
            _check(
                strategy in ("table_wise", "column_wise"),
                f"{key}.ranks: ranks can be pinned for table_wise and column_wise tables, "
                f"not {strategy}; drop the ranks or set {key}.strategy=table_wise",
            )
            _check(
                strategy != "table_wise" or len(pin.ranks) == 1,
                f"{key}.ranks={list(pin.ranks)}: a table_wise table lives on one rank; "
                f"give one rank, or {key}.strategy=column_wise for one rank per column block",
            )
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


def _validate_tables(cfg: Config, source_features: Sequence[FeatureSpec]) -> None:
    tables = resolved_tables(cfg, source_features)
    names = [t.name for t in tables]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"model.tables: table names must be unique, repeated: {dupes}")
    features = [f for t in tables for f in t.feature_names]
    dupes = sorted({f for f in features if features.count(f) > 1})
    _check(
        not dupes,
        f"model.tables: each feature feeds one table, but {dupes} appear in several",
    )
    data_features = [f.name for f in source_features]
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
    rows_needed = {f.name: f.num_embeddings for f in source_features}
    for i, t in enumerate(tables):
        key = f"model.tables[{i}]" if cfg.model.tables else f"table {t.name}"
        _check(bool(t.feature_names), f"{key}.feature_names is empty")
        _positive(f"{key}.num_embeddings", t.num_embeddings)
        _positive(f"{key}.embedding_dim", t.embedding_dim)
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


def _validate_distill(cfg: Config) -> None:
    d = cfg.distill
    if d.name == "none":
        return
    _check(0 <= d.alpha <= 1, f"distill.alpha={d.alpha} must be in [0, 1] (1: labels only)")
    _positive("distill.temperature", d.temperature)
    _check(d.warmup_steps >= 0, f"distill.warmup_steps={d.warmup_steps} must be >= 0")
    for key, sizes in [
        ("distill.dense_arch_layer_sizes", d.dense_arch_layer_sizes),
        ("distill.over_arch_layer_sizes", d.over_arch_layer_sizes),
    ]:
        _layer_sizes(key, sizes)
    _check(
        len(d.over_arch_layer_sizes) >= 2 and d.over_arch_layer_sizes[-1] == 1,
        f"distill.over_arch_layer_sizes={list(d.over_arch_layer_sizes)} needs at least two "
        f"layers ending in 1 (one click logit); e.g. distill.over_arch_layer_sizes=[16,1]",
    )
    dim = cfg.model.embedding_dim if d.share_tables else d.embedding_dim
    _positive("distill.embedding_dim", d.embedding_dim)
    where = "model.embedding_dim (share_tables)" if d.share_tables else "distill.embedding_dim"
    _check(
        d.dense_arch_layer_sizes[-1] == dim,
        f"distill.dense_arch_layer_sizes[-1]={d.dense_arch_layer_sizes[-1]} must equal the "
        f"student's embedding dim {where}={dim} (the interaction stacks them); set them equal",
    )
    _check(
        d.student_qat_bits in (0, 2, 4, 8),
        f"distill.student_qat_bits={d.student_qat_bits}: use 8, 4 or 2, or 0 for off",
    )
    _check(
        not (d.share_tables and d.student_qat_bits),
        "distill.student_qat_bits with distill.share_tables=true: the student has no tables "
        "of its own; quantize the shared tables with qat.bits (or qat.table_bits)",
    )
    if d.teacher_checkpoint is not None:
        path = Path(d.teacher_checkpoint)
        _check(is_complete(path), missing_message(path, key="distill.teacher_checkpoint"))
    _check(
        not d.freeze_teacher or d.teacher_checkpoint is not None,
        "distill.freeze_teacher=true without distill.teacher_checkpoint would keep an "
        "untrained teacher; give distill.teacher_checkpoint=.../checkpoints/step_N",
    )


def _validate_prune(cfg: Config) -> None:
    p = cfg.prune
    _check(p.row_min_norm >= 0, f"prune.row_min_norm={p.row_min_norm} must be >= 0 (0: off)")
    _check(
        p.rows_by in ("norm", "access"),
        f"prune.rows_by={p.rows_by}: use norm (prune.row_min_norm) or access (prune.min_access)",
    )
    _check(p.min_access >= 0, f"prune.min_access={p.min_access} must be >= 0 (0: off)")
    _check(
        not (p.rows_by == "norm" and p.min_access > 0),
        f"prune.min_access={p.min_access} has no effect with prune.rows_by=norm; "
        "add prune.rows_by=access",
    )
    _check(
        not (p.rows_by == "access" and p.row_min_norm > 0),
        f"prune.row_min_norm={p.row_min_norm} has no effect with prune.rows_by=access; "
        "use prune.min_access (or prune.rows_by=norm)",
    )
    _check(
        0 <= p.dense_sparsity < 1,
        f"prune.dense_sparsity={p.dense_sparsity} must be in [0, 1) (0: off)",
    )
    if p.dense_sparsity:
        _positive("prune.dense_every_steps", p.dense_every_steps)
        _check(
            0 <= p.dense_start_step <= p.dense_end_step,
            f"prune.dense_start_step={p.dense_start_step} and dense_end_step="
            f"{p.dense_end_step}: need 0 <= start <= end",
        )


def _validate_qat(cfg: Config, tables: Sequence[Any]) -> None:
    names = [t.name for t in tables]
    _check(
        0 <= cfg.qat.start_step < max(cfg.trainer.num_steps, 1),
        f"qat.start_step={cfg.qat.start_step} must be in [0, trainer.num_steps="
        f"{cfg.trainer.num_steps}): the fp32 steps before table QAT starts",
    )
    for key, b in [("qat.bits", cfg.qat.bits)] + [
        (f"qat.table_bits.{n}", b) for n, b in cfg.qat.table_bits.items()
    ]:
        _check(b in (0, 2, 4, 8), f"{key}={b}: use 8 or 4 (2 also works), or 0 for off")
    _check(
        cfg.qat.small_table_bits in (2, 4, 8),
        f"qat.small_table_bits={cfg.qat.small_table_bits}: the bits of tables under "
        f"qat.small_table_rows; use 8, 4 or 2",
    )
    _check(
        cfg.qat.small_table_rows >= 0,
        f"qat.small_table_rows={cfg.qat.small_table_rows}: a row count (0: off)",
    )
    for name in cfg.qat.table_bits:
        _check(name in names, f"qat.table_bits.{name}: no such table")
    _check(
        cfg.qat.dense_bits in (0, 8),
        f"qat.dense_bits={cfg.qat.dense_bits}: the dense layers train against int8 weights "
        f"only; use qat.dense_bits=8, or 0 for off",
    )
    quantized = qat_bits(cfg, tables)
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
