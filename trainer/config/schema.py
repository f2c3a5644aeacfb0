"""Typed configuration: the Hydra schema, and the one place that validates it.

Hydra composes ``conf/`` against these dataclasses (registered in the
ConfigStore as ``shardrec_schema``), so a mistyped key or a wrong type fails at
compose time. :func:`to_config` turns the composed ``DictConfig`` into plain
dataclasses once, at the entry point; :func:`validate` then checks what a
schema cannot (cross-field constraints) and raises :class:`ConfigError` naming
the key and the fix.

Example::

    cfg = to_config(hydra_cfg)
    validate(cfg, world_size=2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sharding.strategies import STRATEGIES as PLANNER_STRATEGIES
from trainer.config.choices import choices as _choices
from trainer.config.compression_schema import (
    BudgetConfig,
    LowRankDenseConfig,
    PrecisionConfig,
    PruneConfig,
    QATConfig,
)
from trainer.data.prefetch import PREFETCH_MODES
from trainer.data.synthetic_config import SyntheticDataConfig
from trainer.errors import ConfigError
from trainer.report.logger import LOGGER_NAMES, WANDB_MODES, LoggerConfig

Arch = _choices("Arch", ("dlrm", "dlrm_dcnv2", "deepfm", "wide_deep"))
Pooling = _choices("Pooling", ("sum", "mean"))
IdManagementName = _choices("IdManagementName", ("direct", "hash", "managed_collision"))
Eviction = _choices("Eviction", ("lru", "lfu"))
# The strategy names are the sharding package's (the only place they are defined).
Strategy = _choices("Strategy", PLANNER_STRATEGIES)
ComputeKernel = _choices("ComputeKernel", ("fused", "dense", "fused_uvm_caching"))
CommPrecision = _choices("CommPrecision", ("fp32", "fp16", "bf16"))
DenseOptimizer = _choices("DenseOptimizer", ("adam", "adagrad", "sgd"))
LRSchedule = _choices("LRSchedule", ("constant", "cosine", "linear_decay"))
PipelineName = _choices("PipelineName", ("sparse_dist", "base"))
Prefetch = _choices("Prefetch", PREFETCH_MODES)
Device = _choices("Device", ("auto", "cpu", "cuda"))
ComputeDevice = _choices("ComputeDevice", ("cuda", "cpu"))
LoggerName = _choices("LoggerName", LOGGER_NAMES)
WandbMode = _choices("WandbMode", WANDB_MODES)
OnNonfinite = _choices("OnNonfinite", ("stop", "skip"))
OnCheckpointError = _choices("OnCheckpointError", ("stop", "warn"))

STRATEGIES = tuple(Strategy)


@dataclass
class TableConfig:
    name: str = MISSING
    num_embeddings: int = MISSING
    # 0 means "use model.embedding_dim".
    embedding_dim: int = 0
    feature_names: list[str] = field(default_factory=list)
    pooling: Pooling = Pooling.sum
    # Factorized (compression/factorized.py, every arch): stored width (a rank-r
    # table plus an r x dim projection; 0: model.table_rank / mixed_dims / full width),
    # quotient-remainder split into tables of ceil(rows/m) and m rows (0: model.qr_*),
    # and how the pair combines: mul | add | concat ("": model.qr_op).
    rank: int = 0
    qr_buckets: int = 0
    qr_op: str = ""


@dataclass
class ModelConfig:
    # dlrm | dlrm_dcnv2 | deepfm | wide_deep (trainer/models/ctr.py: the last two have a
    # first-order part, one w_<table> per table, and no bottom MLP).
    arch: Arch = Arch.dlrm
    embedding_dim: int = 16
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    # DLRM-DCNv2 only: low-rank cross layers (MLPerf reference: 3 layers, rank 512).
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 64
    # Factorized tables (every arch; per table in tables[].rank / qr_*; docs/compression.md):
    # table_rank: every table stored rank-r (projected to embedding_dim; 0: off);
    # qr_min_rows: tables with at least this many rows split quotient-remainder into
    # qr_buckets (0: ceil(sqrt(rows))) combined by qr_op (mul | add | concat); 0: off;
    # mixed_dims: alpha > 0 stores each table at embedding_dim * (min rows / rows)^alpha
    # (a multiple of 4, at least 4) and projects it to embedding_dim; 0: off.
    table_rank: int = 0
    qr_min_rows: int = 0
    qr_buckets: int = 0
    qr_op: str = "mul"
    mixed_dims: float = 0.0
    pooling: Pooling = Pooling.sum
    # Empty: one table per categorical feature of the data source, sized by it.
    tables: list[TableConfig] = field(default_factory=list)
    # How raw ids reach rows (trainer/models/collision.py): direct (a row per id), hash
    # (id % rows) or managed_collision (torchrec MCH remap with eviction); the last two
    # keep mc_zch_size rows per table (0: the source's rows) and shard row-wise.
    id_management: IdManagementName = IdManagementName.direct
    mc_zch_size: int = 0
    mc_eviction: Eviction = Eviction.lru
    mc_eviction_interval: int = 1
    # Admission: an id enters only if seen more than this often in an eviction interval.
    mc_admit_min_count: int = 0
    # Raw ids are < this (0: each table's source rows); sharding cuts this range in blocks.
    mc_input_hash_size: int = 0


@dataclass
class TopologyConfig:
    """What the planner plans for. None: the running job's own value."""

    world_size: int | None = None
    local_world_size: int | None = None
    # Per device: HBM on CUDA; host memory (DDR) per rank on CPU.
    hbm_gb: float = 80.0
    ddr_gb: float = 64.0
    # cuda | cpu; None: the device this job runs on.
    compute_device: ComputeDevice | None = None
    # Share of device memory the planner keeps free for dense parts and activations.
    storage_reservation_percentage: float = 0.15
    # Per device, in GB/s (1024**3 bytes); None: torchrec's defaults (600 / 12.5).
    intra_host_bw_gbps: float | None = None
    inter_host_bw_gbps: float | None = None


@dataclass
class TableShardingConfig:
    """One table pinned by hand; unset fields follow the run-wide settings."""

    strategy: Strategy | None = None
    compute_kernel: ComputeKernel | None = None
    # table_wise: one rank; column_wise: one rank per column block.
    ranks: list[int] | None = None


@dataclass
class ShardingConfig:
    strategy: Strategy = Strategy.auto
    compute_kernel: ComputeKernel = ComputeKernel.fused
    # None: gloo on CPU, nccl on CUDA.
    backend: str | None = None
    # auto: CUDA when available, else CPU.
    device: Device = Device.auto
    # Precision on the wire for the embedding all-to-alls: fp32 | fp16 | bf16.
    comm_forward: CommPrecision = CommPrecision.fp32
    comm_backward: CommPrecision = CommPrecision.fp32
    # UVM-caching kernel only (CUDA): share of each table's rows cached in HBM.
    cache_load_factor: float = 0.2
    # Column block width of column_wise / table_column_wise / grid shards; None:
    # torchrec's default (128), so tables of dim <= 128 stay one block.
    column_shard_dim: int | None = None
    # Per-table overrides, by table name: {t_cat_3: {strategy: row_wise}}.
    tables: dict[str, TableShardingConfig] = field(default_factory=dict)
    # 2D sparse parallelism: K groups of world_size/K ranks, each sharding every table,
    # kept in sync each step (sharding/replicas.py). 1: today's one group. auto: the
    # planner picks K (python -m trainer.plan only).
    replicas: Any = 1
    # Which ranks form a group (sharding/replica_plan.py): interleaved (torchrec's default:
    # group g is ranks g, g+K, ...; sync inside a host) | hosts (whole hosts per group,
    # torchrec's use_inter_host_allreduce; sync across hosts). The trainer runs interleaved.
    replica_layout: str = "interleaved"
    # Steps between replica syncs: 1 sums every step's gradients (exact, the K = 1 run);
    # N > 1 sums the replicas' changes every N steps (sharding/replicas.py; diverges).
    replica_sync_every: int = 1


DistillName = _choices("DistillName", ("none", "online"))


@dataclass
class DistillConfig:
    """``distill=`` (conf/distill/): a student trained beside the teacher.

    The pair is trainer/models/distill.py; the loss is compression/distill.py.
    """

    name: DistillName = DistillName.none
    # The student's architecture; None: the teacher's (model.arch).
    arch: Arch | None = None
    # Student loss = alpha * BCE(labels) + (1 - alpha) * T^2 * BCE(sigmoid(s/T), sigmoid(t/T)).
    alpha: float = 0.5
    temperature: float = 1.0
    # Steps of labels-only student training before the distillation term starts.
    warmup_steps: int = 0
    # true: the student reads the teacher's pooled embeddings (one set of tables).
    share_tables: bool = False
    # The student's own tables (share_tables=false): named s_<teacher table>.
    embedding_dim: int = 4
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [16, 4])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [16, 1])
    # QAT bits of the student's own tables (0: qat.bits / qat.table_bits decide).
    student_qat_bits: int = 0
    # Warm start: a checkpoint of a plain run (.../checkpoints/step_N) loaded into the teacher.
    teacher_checkpoint: str | None = None
    # With a teacher checkpoint: keep the teacher fixed (no teacher loss, no updates).
    freeze_teacher: bool = False


@dataclass
class OptimConfig:
    # Tables: FBGEMM's fused exact row-wise Adagrad, applied inside backward.
    embedding_lr: float = 0.05
    embedding_eps: float = 1e-8
    dense_optimizer: DenseOptimizer = DenseOptimizer.adam
    # Adam at 3e-2, cosine down to 0 at the last step: learns within one epoch of a
    # small set and ends the default job where 1e-3 did (docs/studies/2026-12-05-defaults.md).
    dense_lr: float = 3e-2
    dense_weight_decay: float = 0.0
    # The dense rate over the run (sharding/dmp.py: DenseLRSchedule): a linear ramp
    # over the first dense_warmup_steps, then constant, or down to 0 at the last step.
    dense_warmup_steps: int = 0
    dense_lr_schedule: LRSchedule = LRSchedule.cosine
    # The step a decaying rate reaches 0 at, and stays (0: trainer.num_steps); e.g. a
    # day walk's first day: the dense layers learn from the history only.
    dense_decay_steps: int = 0
    # > 0: after dense_decay_steps, decay again from the base rate over each this
    # many steps (warm restarts; a day walk: online.steps_per_day, 0 at each day's end).
    dense_restart_steps: int = 0


@dataclass
class TrainConfig:
    num_steps: int = 2000
    # Per rank: the global batch is batch_size * world_size.
    batch_size: int = 1024
    eval_every_steps: int = 500
    eval_batch_size: int = 4096
    seed: int = 0
    pipeline: PipelineName = PipelineName.sparse_dist
    # Batches built ahead of the step on a thread (trainer/data/prefetch.py): auto =
    # on a GPU fed from host memory (prepared shards), pinned for a non-blocking copy;
    # on | off (the CPU's default under auto: a producer competes with the step).
    prefetch: Prefetch = Prefetch.auto
    # CPU threads per process; None: OMP_NUM_THREADS if set, else half the cores per
    # local rank (OpenMP spinning on oversubscribed cores stalls kernels for ms).
    num_threads: int | None = None
    progress_bar: bool = True
    plot: bool = True
    # At the end: gather the tables, quantize them for serving (the QAT bits, or
    # export_bits for every table when QAT is off) and write the serving bundle (bundle/).
    export: bool = False
    export_bits: int = 8
    # Sharded checkpoints under run_dir/checkpoints/step_N (trainer/checkpoint/load.py),
    # every N steps and at the end; 0: off. The newest checkpoint_keep are kept.
    checkpoint_every_steps: int = 0
    checkpoint_keep: int = 2
    # auto: the newest complete checkpoint of this run directory (fresh if none: a
    # new run gets a new directory, a torchrun restart or SLURM requeue the same);
    # null: always fresh; or a checkpoint directory (.../checkpoints/step_N).
    resume: str | None = "auto"
    # Saves with DCP's async_save: the loop waits only for the snapshot.
    async_checkpoint: bool = True
    # A save that fails (disk full): stop the run, or warn and train on.
    on_checkpoint_error: OnCheckpointError = OnCheckpointError.stop
    # A NaN/Inf loss: stop naming the step, or skip the step on every rank together.
    on_nonfinite: OnNonfinite = OnNonfinite.stop


@dataclass
class OnlineConfig:
    """The day walk (trainer/online/): incremental training over the days of a drifting
    synthetic stream (``data.days``), e.g. ``experiment=online/drift``."""

    # Walk days 0 .. days-1 (at most data.days): evaluate on each day with the model
    # trained so far, then train on it. 0: off (one ordinary run).
    days: int = 0
    # Training steps per day, until trainer.num_steps steps in all are done; the days
    # after are only evaluated (trainer.num_steps=steps_per_day: the frozen baseline).
    steps_per_day: int = 500
    # Day 0's training steps, the history a walk starts from (0: steps_per_day); the
    # frozen baseline trains them only (trainer.num_steps=first_day_steps).
    first_day_steps: int = 0
    # Publish the serving bundle while the walk trains (trainer/online/publish.py):
    # <run_dir>/exports/v<k>/ and exports/LATEST, written in the background.
    publish: bool = False
    # Publish every N global steps (0: at each day's end).
    publish_every_steps: int = 0
    # Keep the newest K published versions (never the one LATEST names).
    publish_keep: int = 3
    # A writer running longer is killed, its version dropped; training goes on.
    publish_timeout_s: float = 600.0
    # A stopping job (preempted, failed) waits at most this long for the publish in
    # flight, then kills its writer: under SLURM it must exit within the grace period
    # (conf/hydra/launcher/slurm.yaml: signal_delay_s=90).
    publish_stop_wait_s: float = 30.0
    # Follow mode (trainer/online/follow.py): train the partitions of data.dir (a
    # partitioned dataset, trainer/data/partitions.py) in order, each as it arrives.
    follow: bool = False
    # Steps per partition (0: one pass over its train rows at the global batch).
    follow_steps: int = 0
    # Seconds between looks at data.dir/manifest.json for a new partition.
    poll_s: float = 30.0
    # Stop (exit 0) after this many seconds with no new partition (0: never).
    idle_timeout_s: float = 3600.0


@dataclass
class LoggerSchema(LoggerConfig):
    """``logger=`` (conf/logger/*.yaml): trainer.logger.LoggerConfig with its choices typed."""

    name: LoggerName = LoggerName.none  # type: ignore[assignment]
    mode: WandbMode = WandbMode.auto  # type: ignore[assignment]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    # One schema per source, chosen by ``data=`` (see DATA_SCHEMAS).
    data: Any = MISSING
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lowrank_dense: LowRankDenseConfig = field(default_factory=LowRankDenseConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    logger: LoggerSchema = field(default_factory=LoggerSchema)


def data_schemas() -> dict[str, type]:
    """``data=`` choices and their schemas; ``conf/data/<name>.yaml`` starts from
    ``<name>_schema`` (stored in the group), so each source checks its own keys."""
    schemas: dict[str, type] = {"synthetic": SyntheticDataConfig}
    try:
        from trainer.data.data_configs import CriteoDataConfig, TableDataConfig
    except ImportError:  # real-data sources not installed in this checkout
        return schemas
    return {**schemas, "criteo": CriteoDataConfig, "table": TableDataConfig}


def register_configs() -> None:
    """Registers the schema that ``conf/config.yaml`` lists first, and the data schemas."""
    store = ConfigStore.instance()
    store.store(name="shardrec_schema", node=Config)
    for name, schema in data_schemas().items():
        store.store(group="data", name=f"{name}_schema", node=schema)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a checkpoint saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> Config:
    """A saved resolved config (e.g. a checkpoint's ``config.yaml``), schema-checked."""
    raw = OmegaConf.create(text)
    schema = OmegaConf.structured(Config)
    name = OmegaConf.select(raw, "data.name", default="synthetic")
    if name not in data_schemas():
        raise ConfigError(f"data.name={name!r} is not known; use one of {list(data_schemas())}")
    schema.data = OmegaConf.structured(data_schemas()[name])
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))  # type: ignore[return-value]


def to_config(cfg: DictConfig) -> Config:
    """Converts a composed Hydra config into plain dataclasses (Hydra stops here)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
