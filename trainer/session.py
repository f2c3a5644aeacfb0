"""A training session: build the run, hand out its ``Trainer``, resume, always tear down.

What ``python -m trainer`` (trainer/train.py) and the day walk
(trainer/online/days.py) share, in the order every rank runs it:

1. the config validated against the source's features, before any process
   starts talking;
2. process group and device from the launcher's environment;
3. :func:`build`: the compression converters (trainer/builder/compression.py),
   the model on the ``meta`` device (no rank ever holds a whole table), the
   tables' optimizer fused into backward, the plan (trainer/plan/run_plan.py),
   DistributedModelParallel (tables sharded, dense part in DDP), the converters
   on it and on the optimizer; the plan logged and saved;
4. the logger, the checkpointer and the ``Trainer`` over them;
5. :meth:`Session.resume` (``trainer.resume``): every Stateful entry from a
   checkpoint.

Example::

    with session(cfg, run_dir=run_dir, source=source) as s:
        s.resume()
        summary = s.trainer.fit(extra=s.extra())
        s.finish(summary)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan

from compression.converter import Converters
from sharding import (
    DistEnv,
    destroy_distributed,
    format_plan,
    init_distributed,
    save_plan,
    shard_model,
)
from sharding.collectives import all_gather_object
from sharding.dist import local_world_size_from_env, world_size_from_env
from sharding.dmp import DenseLRSchedule, combined_optimizer, dense_lr_schedule
from sharding.replica_plan import check_layout, group_shape
from sharding.replicas import (
    ReplicaGroups,
    ReplicaSync,
    ReplicaSyncOptimizer,
    shard_model_in_group,
    training_replicas,
)
from sharding.state import local_table_bytes
from trainer.builder.compression import build_converters
from trainer.checkpoint.load import CHECKPOINT_DIR, load_checkpoint, resolve_resume, restore_records
from trainer.checkpoint.save import Checkpointer
from trainer.config.run_dir import agree_on_run_dir
from trainer.config.saved import check_resumable
from trainer.config.schema import Config, ConfigError, config_to_yaml
from trainer.config.tables import RunTables, run_tables
from trainer.config.validate import (
    open_source,
    validate,
    validate_for_device,
    validate_for_training,
)
from trainer.data.source import DataSource
from trainer.loop.trainer import Trainer
from trainer.plan.run_plan import World, plan_meta_model
from trainer.report.logger import METRICS_FILE, MetricsLogger, make_logger
from trainer.resilience.fault_injection import FaultInjection
from trainer.resilience.nonfinite import NonfiniteGuard
from trainer.resilience.preempt import Preemption

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class Built:
    model: DistributedModelParallel
    optimizer: torch.optim.Optimizer
    plan: ShardingPlan
    tables: RunTables
    converters: Converters
    lr_schedule: DenseLRSchedule | None = None  # stepped by the loop, once per step


def build(cfg: Config, env: DistEnv, *, source: DataSource | None = None) -> Built:
    """Converters -> meta model -> plan -> DMP -> converters on it -> combined optimizer.

    ``source``: the run's data source (default: opened from ``cfg.data``).
    """
    validate_for_device(cfg, env.device.type)
    source = source or open_source(cfg.data, seed=cfg.trainer.seed)
    tables = run_tables(cfg, features=source.features)
    converters = build_converters(cfg, tables=tables, device_type=env.device.type)
    # sharding.replicas=K: K groups of world/K ranks each shard every table by one plan
    # made for world/K ranks (sharding/replicas.py); 1 is one group, the whole world.
    try:
        replicas = training_replicas(cfg.sharding.replicas, env.world_size)
        # interleaved: a group has L / K ranks on every host; hosts: whole hosts of L
        layout = check_layout(cfg.sharding.replica_layout) if replicas > 1 else "interleaved"
        group_size, group_local = group_shape(
            env.world_size, cfg.topology.local_world_size or env.local_world_size, replicas, layout
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    groups = None
    if replicas > 1:
        groups = ReplicaGroups.create(
            world_size=env.world_size,
            replicas=replicas,
            device_type=env.device.type,
            layout=layout,
        )
    world = World(
        world_size=group_size,
        local_world_size=group_local,
        device=torch.device(cfg.topology.compute_device or env.device.type),
    )
    model, planned = plan_meta_model(
        cfg,
        tables=tables,
        num_dense=source.num_dense,
        converters=converters,
        world=world,
        pg=env.pg,
    )
    if groups is None:
        dmp = shard_model(model, plan=planned.plan, env=env, sharders=planned.sharders)
    else:
        dmp = shard_model_in_group(
            model,
            plan=planned.plan,
            env=env,
            groups=groups,
            sharders=planned.sharders,
            node_group_size=world.local_world_size,
        )
    converters.convert_sharded(dmp, device=env.device, process_group=env.pg)
    optimizer = combined_optimizer(
        dmp,
        dense_optimizer=cfg.optim.dense_optimizer,
        dense_lr=cfg.optim.dense_lr,
        dense_weight_decay=cfg.optim.dense_weight_decay,
    )
    try:
        lr_schedule = dense_lr_schedule(
            optimizer,
            warmup_steps=cfg.optim.dense_warmup_steps,
            schedule=cfg.optim.dense_lr_schedule,
            total_steps=cfg.optim.dense_decay_steps or cfg.trainer.num_steps,
            restart_steps=cfg.optim.dense_restart_steps,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    optimizer = converters.wrap_optimizer(dmp, optimizer, device=env.device, process_group=env.pg)
    if groups is not None:  # step() then averages the tables' gradients over the replicas
        sync = ReplicaSync(
            dmp,
            groups=groups,
            eps=cfg.optim.embedding_eps,
            every=cfg.sharding.replica_sync_every,  # N > 1: averages every N steps
        )
        optimizer = ReplicaSyncOptimizer(optimizer, sync)  # type: ignore[arg-type]
    return Built(
        model=dmp,
        optimizer=optimizer,
        plan=planned.plan,
        tables=tables,
        converters=converters,
        lr_schedule=lr_schedule,
    )


def replica_flush(optimizer: Any) -> Callable[[], None] | None:
    """K > 1 synced every N > 1 steps: replicas saved between syncs agree once flushed."""
    sync = getattr(optimizer, "replica_sync", None)
    return sync.flush if sync is not None else None


def set_cpu_threads(num_threads: int | None, *, local_world_size: int) -> int:
    """Intra-op threads for this process; a small count avoids OpenMP oversubscription."""
    if num_threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        num_threads = max(1, (os.cpu_count() or 1) // (2 * local_world_size))
    torch.set_num_threads(num_threads)
    return num_threads


@dataclass
class Session:
    """One run's built parts (see the module docstring)."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    built: Built
    logger: MetricsLogger
    checkpointer: Checkpointer
    trainer: Trainer

    def resume(self) -> Path | None:
        """Loads ``trainer.resume``'s checkpoint into every Stateful entry (collective);
        returns its path, or None for a fresh start."""
        resume_from = resolve_resume(self.cfg.trainer.resume, run_dir=self.run_dir)
        if resume_from is not None:
            check_resumable(resume_from, self.cfg)
            load_checkpoint(resume_from, states=self.trainer.states())
            if self.env.is_main:
                self.trainer.records = restore_records(
                    self.run_dir / METRICS_FILE, step=self.trainer.step
                )
                log.info("resumed from %s at step %d", resume_from, self.trainer.step)
        return resume_from

    def extra(self) -> dict[str, Any]:
        """Collective: what the summary says besides the loop's metrics."""
        table_bytes = [int(b) for b in all_gather_object(local_table_bytes(self.built.model))]
        return {
            "strategy": self.cfg.sharding.strategy,
            **self.built.converters.summary(),  # precision, qat_bits, ...
            "embedding_bytes_per_rank": table_bytes,
            "embedding_bytes": sum(table_bytes),
        }

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``summary.json`` (rank 0) and the logger's summary; returns ``summary``."""
        if self.env.is_main:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.logger.summary(summary)
        return summary


@contextmanager
def session(
    cfg: Config,
    *,
    run_dir: Path,
    source: DataSource | None = None,
    checkpoint_every_steps: int | None = None,
    on_eval: Callable[[int, dict[str, float]], str | None] | None = None,
) -> Iterator[Session]:
    """Validates, starts the process group, builds, and tears everything down on exit.

    ``source``: the run's data (default: opened from ``cfg.data``);
    ``checkpoint_every_steps``: instead of ``trainer.checkpoint_every_steps``;
    ``on_eval``: the loop's hook after each intermediate eval (``Trainer``).
    """
    source = source or open_source(cfg.data, seed=cfg.trainer.seed)
    validate(
        cfg,
        features=source.features,
        world_size=world_size_from_env(),
        local_world_size=local_world_size_from_env(),
    )
    validate_for_training(  # the replica layout as build() applies it
        cfg,
        world_size=world_size_from_env(),
        local_world_size=cfg.topology.local_world_size or local_world_size_from_env(),
    )
    env = init_distributed(
        backend=cfg.sharding.backend,
        device=cfg.sharding.device,
        emulate_local_world_size=cfg.topology.local_world_size,
    )
    logger = None
    preemption = Preemption(device=env.device, world_size=env.world_size).install()
    try:
        run_dir = agree_on_run_dir(run_dir)
        torch.manual_seed(cfg.trainer.seed)
        set_cpu_threads(cfg.trainer.num_threads, local_world_size=env.local_world_size)
        built = build(cfg, env, source=source)
        if env.is_main:
            log.info("sharding plan (%s):\n%s", cfg.sharding.strategy, format_plan(built.plan))
            save_plan(
                built.plan,
                run_dir / "plan.json",
                strategy=cfg.sharding.strategy,
                world_size=env.world_size,
            )
        logger = make_logger(
            cfg.logger, run_dir=run_dir, rank=env.rank, config=dataclasses.asdict(cfg)
        )
        every = cfg.trainer.checkpoint_every_steps
        checkpointer = Checkpointer(
            run_dir / CHECKPOINT_DIR,
            every_steps=every if checkpoint_every_steps is None else checkpoint_every_steps,
            keep=cfg.trainer.checkpoint_keep,
            config_yaml=config_to_yaml(cfg),
            async_save=cfg.trainer.async_checkpoint,
            on_error=cfg.trainer.on_checkpoint_error,
            before_save=replica_flush(built.optimizer),
        )
        trainer = Trainer(
            model=built.model,
            optimizer=built.optimizer,
            env=env,
            source=source,
            settings=cfg.trainer,
            logger=logger,
            run_dir=run_dir,
            model_fwd=built.converters.wrap_forward(built.model),
            checkpointer=checkpointer,
            extra_states={"compression": built.converters},
            preemption=preemption,
            nonfinite=NonfiniteGuard(
                policy=cfg.trainer.on_nonfinite,
                model=built.model,
                device=env.device,
                checkpoint_dir=checkpointer.directory,
                before_stop=checkpointer.wait,  # a good save in flight is kept
            ),
            faults=FaultInjection.from_env(rank=env.rank),
            on_eval=on_eval,
            lr_schedule=built.lr_schedule,
        )
        yield Session(cfg, env, run_dir, built, logger, checkpointer, trainer)
    finally:
        preemption.uninstall()
        if logger is not None:
            logger.finish()
        destroy_distributed()
