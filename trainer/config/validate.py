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

from sharding.replica_plan import check_layout, group_shape
from sharding.replicas import parse_replicas
from sharding.strategies import HIERARCHICAL
from trainer.checkpoint.load import check_checkpoint
from trainer.config.checks import check, layer_sizes, positive
from trainer.config.schema import (
    STRATEGIES,
    Config,
    ConfigError,
    ModelConfig,
    TableConfig,
)
from trainer.config.tables import run_tables, student_arch, wide_tables
from trainer.config.validate_compression import (
    validate_budget,
    validate_distill,
    validate_lowrank_dense,
    validate_prune,
    validate_qat,
)
from trainer.config.validate_ids import validate_id_management
from trainer.config.validate_online import validate_online
from trainer.data import DataSource, make_source
from trainer.data.source import FeatureSpec
from trainer.data.synthetic_config import MAX_CARDINALITY, SyntheticDataConfig
from trainer.data.zipf import EXACT_RANKS
from trainer.report.logger import _has_wandb_credentials, wandb_mode


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


def validate_for_training(cfg: Config, *, world_size: int, local_world_size: int) -> None:
    """What a training run (``python -m trainer``) refuses that planning accepts.

    ``sharding.replica_layout`` / ``replica_sync_every`` as the trainer applies them
    (trainer/session.py): the layout must cut whole hosts per group, N >= 1.
    """
    s = cfg.sharding
    check(
        s.replica_sync_every >= 1,
        f"sharding.replica_sync_every={s.replica_sync_every} must be >= 1 (1: every step, exact)",
    )
    try:
        replicas = parse_replicas(s.replicas, world_size)
        if replicas is not None and replicas > 1:
            group_shape(world_size, local_world_size, replicas, check_layout(s.replica_layout))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate_synthetic(d: SyntheticDataConfig) -> None:
    """``data=synthetic``: what the planted model needs."""
    check(d.num_dense >= 0, f"data.num_dense={d.num_dense} must be >= 0")
    check(
        len(d.cardinalities) > 0,
        "data.cardinalities is empty; give one row count per categorical feature",
    )
    bad = [c for c in d.cardinalities if not 1 <= c < MAX_CARDINALITY]
    check(not bad, f"data.cardinalities has {bad}; every table needs 1 <= rows < 2**31")
    check(
        len(d.hotness) in (1, len(d.cardinalities)),
        f"data.hotness has {len(d.hotness)} values for {len(d.cardinalities)} features; "
        "give one value for all features or one per feature",
    )
    check(min(d.hotness) >= 1, f"data.hotness={list(d.hotness)} must be >= 1 everywhere")
    check(d.zipf_exponent >= 0, f"data.zipf_exponent={d.zipf_exponent} must be >= 0 (0 is uniform)")
    check(d.num_eval_samples >= 1, f"data.num_eval_samples={d.num_eval_samples} must be >= 1")
    check(d.num_interactions >= 0, f"data.num_interactions={d.num_interactions} must be >= 0")
    check(d.latent_dim >= 1, f"data.latent_dim={d.latent_dim} must be >= 1")
    check(d.days >= 0, f"data.days={d.days} must be >= 0 (0: one fixed data set)")
    if d.days:  # the drifting stream (trainer/data/drift.py)
        check(
            0 <= d.new_id_share <= 0.5,
            f"data.new_id_share={d.new_id_share} must be in [0, 0.5] (a share of lookups)",
        )
        check(d.popularity_shift >= 0, f"data.popularity_shift={d.popularity_shift} must be >= 0")
        check(0 <= d.effect_drift <= 1, f"data.effect_drift={d.effect_drift} must be in [0, 1]")
        big = [c for c in d.cardinalities if c > EXACT_RANKS]
        check(
            not big,
            f"data.cardinalities has {big}: with data.days={d.days} every table has at most "
            f"{EXACT_RANKS} rows (a day's catalogue is tabulated whole); lower them or set "
            f"data.days=0",
        )


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
    check(
        0 < s.cache_load_factor <= 1,
        f"sharding.cache_load_factor={s.cache_load_factor} must be in (0, 1]",
    )
    positive("precision.loss_scale", cfg.precision.loss_scale)
    check(
        t.export_bits in (2, 4, 8),
        f"trainer.export_bits={t.export_bits}: use 8 or 4 (2 also works)",
    )
    _validate_checkpoints(cfg)
    validate_online(cfg)
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
        positive(key, value)
    for key, steps in [
        ("optim.dense_decay_steps", o.dense_decay_steps),
        ("optim.dense_restart_steps", o.dense_restart_steps),
    ]:
        check(steps >= 0, f"{key}={steps} must be >= 0")
    for key, sizes in [
        ("model.dense_arch_layer_sizes", m.dense_arch_layer_sizes),
        ("model.over_arch_layer_sizes", m.over_arch_layer_sizes),
    ]:
        layer_sizes(key, sizes)
    check(
        len(m.over_arch_layer_sizes) >= 2,
        f"model.over_arch_layer_sizes={list(m.over_arch_layer_sizes)} needs at least two "
        f"layers (torchrec's OverArch); e.g. model.over_arch_layer_sizes=[64,1]",
    )
    check(
        m.over_arch_layer_sizes[-1] == 1,
        f"model.over_arch_layer_sizes must end in 1 (one click logit), got "
        f"{list(m.over_arch_layer_sizes)}; e.g. model.over_arch_layer_sizes=[64,32,1]",
    )
    tables = run_tables(cfg, features=features)
    _validate_tables(cfg.model, tables.model, features)
    archs = {m.arch} | ({student_arch(cfg.distill, m)} if cfg.distill.name != "none" else set())
    if "dlrm_dcnv2" in archs:  # the student's cross layers are model.dcn_* too
        positive("model.dcn_num_layers", m.dcn_num_layers)
        positive("model.dcn_low_rank_dim", m.dcn_low_rank_dim)
    _validate_student_arch(cfg)
    validate_distill(cfg)
    validate_prune(cfg)
    validate_lowrank_dense(cfg)
    validate_budget(cfg)
    validate_id_management(cfg)
    # With distill=online, the student's own tables too (s_t_cat_0, ...).
    _validate_sharding(cfg, tables.trained, world_size, local_world_size or world_size)
    try:  # sharding.replicas: a count dividing the world, or auto
        parse_replicas(s.replicas, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    validate_qat(cfg, tables.trained)
    managed = cfg.model.id_management != "direct"  # row_wise on one rank too
    if s.strategy in ("row_wise", "column_wise") and world_size < 2 and not managed:
        raise ConfigError(
            f"sharding.strategy={s.strategy} splits tables across ranks and needs "
            f"world_size > 1 (got {world_size}); launch with "
            f"`torchrun --nproc_per_node=2 -m trainer sharding={s.strategy}`"
        )
    if s.column_shard_dim is not None:
        check(
            s.column_shard_dim > 0 and s.column_shard_dim % 4 == 0,
            f"sharding.column_shard_dim={s.column_shard_dim}: use a positive multiple of 4 "
            f"(FBGEMM's row alignment), or null for torchrec's default (128)",
        )
        wide = {t.name for t in wide_tables(tables.trained)}
        for table in tables.trained:
            if table.name in wide:
                continue  # WIDE_DIM (4) columns: one block at any multiple of 4
            check(
                table.embedding_dim % s.column_shard_dim == 0,
                f"sharding.column_shard_dim={s.column_shard_dim} does not divide table "
                f"{table.name!r} (dim {table.embedding_dim}) into equal column blocks; "
                f"pick a divisor of model.embedding_dim",
            )
    if cfg.logger.name == "wandb" and wandb_mode(cfg.logger.mode) == "online":
        check(
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
            positive(key, value)
    positive("topology.hbm_gb", topo.hbm_gb)
    positive("topology.ddr_gb", topo.ddr_gb)
    if topo.world_size is not None and topo.world_size != world_size:
        raise ConfigError(
            f"topology.world_size={topo.world_size} but this job has {world_size} "
            f"process(es); the trainer plans for the job it runs (drop the override), "
            f"`python -m trainer.plan` plans for clusters you do not have"
        )


def _validate_student_arch(cfg: Config) -> None:
    """``distill.arch``: a student of another architecture needs tables of its own."""
    d = cfg.distill
    if d.name == "none" or not d.share_tables:
        return
    arch = student_arch(d, cfg.model)
    check(
        arch == cfg.model.arch,
        f"distill.arch={arch} with distill.share_tables=true: a shared-table student reads "
        f"the teacher's lookups, so it must be a {cfg.model.arch} like the teacher "
        f"(model.arch); drop distill.arch, or set distill.share_tables=false",
    )


def _validate_checkpoints(cfg: Config) -> None:
    t = cfg.trainer
    check(
        t.checkpoint_every_steps >= 0,
        f"trainer.checkpoint_every_steps={t.checkpoint_every_steps} must be >= 0 "
        f"(0 turns checkpoints off)",
    )
    check(
        t.checkpoint_keep >= 1,
        f"trainer.checkpoint_keep={t.checkpoint_keep} must be at least 1 "
        f"(to keep none, set trainer.checkpoint_every_steps=0)",
    )
    if t.resume not in (None, "auto"):
        check_checkpoint(Path(t.resume), key="trainer.resume")


def _validate_sharding(
    cfg: Config, tables: Sequence[Any], world_size: int, env_local_world_size: int
) -> None:
    s = cfg.sharding
    names = [t.name for t in tables]
    for name, pin in s.tables.items():
        key = f"sharding.tables.{name}"
        check(name in names, f"{key}: no such table; tables are {names[0]}..{names[-1]}")
        check(
            pin.strategy != "auto",
            f"{key}.strategy=auto: pin a strategy ({', '.join(STRATEGIES[1:])}) or drop the key",
        )
        for r in pin.ranks or []:
            check(0 <= r < world_size, f"{key}.ranks has {r}, outside 0..{world_size - 1}")
        if pin.ranks:
            strategy = pin.strategy or s.strategy
            check(
                strategy in ("table_wise", "column_wise"),
                f"{key}.ranks: ranks can be pinned for table_wise and column_wise tables, "
                f"not {strategy}; drop the ranks or set {key}.strategy=table_wise",
            )
            check(
                strategy != "table_wise" or len(pin.ranks) == 1,
                f"{key}.ranks={list(pin.ranks)}: a table_wise table lives on one rank; "
                f"give one rank, or {key}.strategy=column_wise for one rank per column block",
            )
    local = cfg.topology.local_world_size or env_local_world_size
    used = {s.strategy} | {p.strategy for p in s.tables.values() if p.strategy}
    for strategy in sorted(used & set(HIERARCHICAL)):
        check(
            local < world_size and world_size % local == 0,
            f"sharding {strategy} splits tables within a host and across hosts, so it needs "
            f"several hosts: local world size {local} must divide world size {world_size} "
            f"and be smaller; on one machine, emulate hosts with e.g. "
            f"`torchrun --nproc_per_node=4 -m trainer sharding={strategy} "
            f"topology.local_world_size=2`",
        )


def _validate_tables(
    model: ModelConfig, tables: Sequence[TableConfig], source_features: Sequence[FeatureSpec]
) -> None:
    names = [t.name for t in tables]
    dupes = sorted({n for n in names if names.count(n) > 1})
    check(not dupes, f"model.tables: table names must be unique, repeated: {dupes}")
    features = [f for t in tables for f in t.feature_names]
    dupes = sorted({f for f in features if features.count(f) > 1})
    check(
        not dupes,
        f"model.tables: each feature feeds one table, but {dupes} appear in several",
    )
    data_features = [f.name for f in source_features]
    missing = [f for f in data_features if f not in features]
    unknown = [f for f in features if f not in data_features]
    check(
        not unknown,
        f"model.tables names features the data does not have: {unknown}; "
        f"the data has {data_features[0]}..{data_features[-1]}",
    )
    check(
        not missing,
        f"model.tables leaves data features without a table: {missing}; "
        f"add them to a table's feature_names",
    )
    rows_needed = {f.name: f.num_embeddings for f in source_features}
    for i, t in enumerate(tables):
        key = f"model.tables[{i}]" if model.tables else f"table {t.name}"
        check(bool(t.feature_names), f"{key}.feature_names is empty")
        positive(f"{key}.num_embeddings", t.num_embeddings)
        positive(f"{key}.embedding_dim", t.embedding_dim)
        needed = max(rows_needed[f] for f in t.feature_names)
        check(
            t.num_embeddings >= needed,
            f"{key}.num_embeddings={t.num_embeddings} is smaller than the "
            f"cardinality {needed} of its features; ids would index past the table",
        )
    _validate_arch_dims(model, tables)


def _validate_arch_dims(model: ModelConfig, tables: Sequence[TableConfig]) -> None:
    """What each architecture needs of the field tables' dims."""
    if model.arch == "wide_deep":
        return  # the deep MLP reads the embeddings concatenated: any dims
    if model.arch == "deepfm":
        # The FM term sums pairwise dot products of the field embeddings.
        dims = sorted({t.embedding_dim for t in tables})
        check(
            len(dims) == 1,
            f"model.arch=deepfm: the FM term needs every table of one embedding_dim, got "
            f"{dims} ({', '.join(f'{t.name}: {t.embedding_dim}' for t in tables)}); drop "
            f"model.tables[*].embedding_dim (model.embedding_dim for all), or use "
            f"model=wide_deep (any dims)",
        )
        return
    # DLRM's dot interaction (and DLRM-DCN's cross layers, as torchrec builds them)
    # stack the dense projection with every pooled embedding, so dims must agree.
    bottom = model.dense_arch_layer_sizes[-1]
    for t in tables:
        check(
            t.embedding_dim == bottom,
            f"table {t.name!r} has embedding_dim={t.embedding_dim} but the "
            f"interaction needs it equal to the last bottom-MLP size "
            f"model.dense_arch_layer_sizes[-1]={bottom}; set them equal",
        )
