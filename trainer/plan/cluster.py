"""``python -m trainer.plan [overrides]``: a sharding plan for a cluster you do not have.

It composes the same ``conf/`` as the trainer and plans through the same
function (``trainer.planning.plan_model``: per-table overrides, UVM cache load
factor, pinned ranks, the table precision, comm codecs), on the ``meta``
device with no process group, for the ``topology.*`` keys, and writes into the
Hydra run directory:

- ``plan.json``: the plan, plus per-table and per-rank memory and cost estimates;
- ``plan.txt``: the table it also prints;
- ``memory.png``: per-rank HBM and DDR used against the caps.

Example::

    python -m trainer.plan experiment=mlperf_dcnv2 topology.world_size=64 \\
        topology.local_world_size=8 topology.hbm_gb=80

``topology.world_size`` is required; ``topology.compute_device`` defaults to
cuda (a plan for 64 GPUs is a CUDA plan even when made on a laptop). Exit codes:
0 planned, 2 config error, 3 the model does not fit (one message on stderr
naming the tables, the bytes needed and the bytes available).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torchrec.distributed.planner.types import PlannerError

from sharding import save_plan
from sharding.estimate import (
    PlanCapture,
    RankEstimate,
    TableEstimate,
    rank_estimates,
    table_estimates,
)
from sharding.memory_plot import plot_rank_memory
from sharding.quiet import quiet_libraries
from sharding.replica_plan import (
    ReplicaEstimate,
    check_layout,
    estimate_replicas,
    format_replica_table,
    group_shape,
    pick_replicas,
    replica_candidates,
)
from sharding.replicas import parse_replicas
from sharding.report import estimates_to_dict, format_estimates
from trainer.builder.compression import build_converters
from trainer.config.compose import CONF_DIR, config_error_line
from trainer.config.schema import Config, ConfigError, to_config
from trainer.config.tables import run_tables
from trainer.config.validate import open_source
from trainer.config.validate import validate as validate_config
from trainer.plan.run_plan import Planned, World, no_fit_message, plan_meta_model

EXIT_CONFIG_ERROR = 2
EXIT_DOES_NOT_FIT = 3


class DoesNotFit(RuntimeError):
    """No placement of the tables fits the topology; the message says why."""


@dataclass(frozen=True)
class ClusterPlan:
    report: str
    run_dir: Path
    peak_hbm_bytes: int
    peak_ddr_bytes: int
    plan_time_s: float
    replicas: int = 1
    replica_estimates: list[ReplicaEstimate] = field(default_factory=list)


def _check_topology(cfg: Config) -> int:
    topo = cfg.topology
    if topo.world_size is None:
        raise ConfigError(
            "topology.world_size is required: the number of devices to plan for, e.g. "
            "topology.world_size=64 topology.local_world_size=8 topology.hbm_gb=80"
        )
    for key in ("intra_host_bw_gbps", "inter_host_bw_gbps"):
        value = getattr(topo, key)
        if value is not None and value <= 0:
            raise ConfigError(f"topology.{key}={value} must be positive (GB/s) or null")
    return topo.world_size


@dataclass
class GroupPlan:
    """One group's plan (a world of its own: ``world_size`` ranks, ``local_world_size``
    per host) with its estimates; the same for every N that has such groups."""

    planned: Planned
    capture: PlanCapture
    tables: list[TableEstimate]
    ranks: list[RankEstimate]


@dataclass
class _GroupPlan:
    group: GroupPlan
    estimate: ReplicaEstimate


def sync_bandwidth(cfg: Config) -> float:
    """Bytes/ms of the replica sync: intra-host (interleaved) or inter-host (hosts)."""
    topo = cfg.topology
    if cfg.sharding.replica_layout == "hosts":  # torchrec's defaults: 12.5 and 600 GB/s
        return (topo.inter_host_bw_gbps or 12.5) * 1024**3 / 1000
    return (topo.intra_host_bw_gbps or 600) * 1024**3 / 1000


def _plan_group(cfg: Config, ctx: dict[str, Any], replicas: int) -> _GroupPlan:
    """One group's plan (world_size/replicas ranks) and its figures for the whole world."""
    shard = cfg.sharding
    world_size, local = ctx["world_size"], ctx["local_world_size"]
    try:
        size, group_local = group_shape(world_size, local, replicas, shard.replica_layout)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cache: dict[tuple[int, int], GroupPlan] = ctx["group_cache"]
    if (size, group_local) not in cache:
        cache[size, group_local] = _plan_one_group(cfg, ctx, size, group_local)
    group = cache[size, group_local]
    estimate = estimate_replicas(
        group.capture.best_plan,
        group.ranks,
        replicas=replicas,
        world_size=world_size,
        group_local_world_size=group_local,
        sync_bw_bytes_per_ms=sync_bandwidth(cfg),
        layout=shard.replica_layout,
        sync_every=shard.replica_sync_every,
        plan_time_s=group.capture.run_time_s,
    )
    return _GroupPlan(group, estimate)


def _plan_one_group(cfg: Config, ctx: dict[str, Any], size: int, local: int) -> GroupPlan:
    topo, shard = cfg.topology, cfg.sharding
    capture = PlanCapture()
    world = World(
        world_size=size, local_world_size=local, device=torch.device(ctx["compute_device"])
    )
    try:
        _, planned = plan_meta_model(
            cfg,
            tables=ctx["tables"],
            num_dense=ctx["num_dense"],
            converters=ctx["converters"],
            world=world,
            pg=None,
            stats=[capture],
        )
    except PlannerError as err:
        raise DoesNotFit(
            no_fit_message(
                ctx["tables"].trained, world, sharding=shard, topology=topo, planner_error=err
            )
        ) from None
    ranks = rank_estimates(
        capture.best_plan,
        planned.topology,
        storage_reservation_percentage=topo.storage_reservation_percentage,
    )
    return GroupPlan(planned, capture, table_estimates(capture.best_plan), ranks)


def plan_cluster(
    cfg: Config,
    *,
    run_dir: Path,
    group_cache: dict[tuple[int, int], GroupPlan] | None = None,
) -> ClusterPlan:
    """Plans ``cfg`` for its topology; writes plan.json, plan.txt, memory.png.

    ``sharding.replicas=K`` plans one group of world_size/K ranks; ``auto`` plans
    every K of :func:`sharding.replica_plan.replica_candidates` and keeps the best.
    ``group_cache`` (keyed by the group's ranks and ranks per host) reuses group
    plans across calls whose configs differ only in ``topology.world_size`` and
    the replica settings (benchmarks/weak_scaling.py).
    """
    world_size = _check_topology(cfg)
    source = open_source(cfg.data)
    validate_config(cfg, features=source.features, world_size=world_size)
    topo, shard = cfg.topology, cfg.sharding
    compute_device = topo.compute_device or "cuda"
    local_world_size = min(topo.local_world_size or world_size, world_size)
    tables = run_tables(cfg, features=source.features)
    ctx: dict[str, Any] = {
        "world_size": world_size,
        "local_world_size": local_world_size,
        "compute_device": compute_device,
        "tables": tables,
        "num_dense": source.num_dense,
        "converters": build_converters(cfg, tables=tables, device_type=compute_device),
    }
    ctx["group_cache"] = {} if group_cache is None else group_cache
    try:
        layout = check_layout(shard.replica_layout)
        requested = parse_replicas(shard.replicas, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if shard.replica_sync_every < 1:
        raise ConfigError(
            f"sharding.replica_sync_every={shard.replica_sync_every} must be >= 1 (1: every step)"
        )
    candidates = (
        replica_candidates(world_size, local_world_size, layout)
        if requested is None
        else [requested]
    )
    groups = {k: _plan_group(cfg, ctx, k) for k in candidates}
    chosen = groups[pick_replicas([g.estimate for g in groups.values()]).replicas]
    replicas, est = chosen.estimate.replicas, chosen.estimate
    group = chosen.group
    plan, topology, capture = group.planned.plan, group.planned.topology, group.capture
    table_est, rank_est = group.tables, group.ranks
    num_hosts = -(-world_size // local_world_size)
    batch = cfg.trainer.batch_size
    memory = f"HBM {topo.hbm_gb:g} GiB, " if compute_device != "cpu" else ""
    header = (
        f"sharding plan for {world_size} {compute_device} device(s), {num_hosts} host(s) of "
        f"{local_world_size}; per device {memory}DDR {topo.ddr_gb:g} GiB\n"
        f"strategy {shard.strategy}, kernel {shard.compute_kernel}; batch {batch} per rank "
        f"({batch * world_size:,} global); planned in {capture.run_time_s:.1f} s "
        f"({capture.num_proposals} proposals)\n"
    )
    if requested != 1:
        mapping = (
            f"group x {topology.world_size} + group rank"
            if layout == "hosts"
            else f"group rank x {replicas} + group"
        )
        header += (
            f"replicas {replicas} ({shard.replicas}, layout {layout}, sync every "
            f"{shard.replica_sync_every} step(s)): {replicas} groups of "
            f"{topology.world_size} ranks ({est.group_local_world_size} per host), each "
            f"serving {batch * topology.world_size:,} samples; the tables below are one "
            f"group's (group ranks; global rank = {mapping})\n\n"
            + format_replica_table([g.estimate for g in groups.values()], chosen=replicas)
            + "\n"
        )
    report = header + "\n" + format_estimates(table_est, rank_est)
    save_plan(
        plan,
        run_dir / "plan.json",
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        strategy=shard.strategy,
        batch_size_per_rank=batch,
        hbm_gb=topo.hbm_gb,
        ddr_gb=topo.ddr_gb,
        intra_host_bw_gbps=topo.intra_host_bw_gbps,
        inter_host_bw_gbps=topo.inter_host_bw_gbps,
        storage_reservation_percentage=topo.storage_reservation_percentage,
        replicas=replicas,
        replica_layout=layout,
        replica_sync_every=shard.replica_sync_every,
        group_size=topology.world_size,
        replica_table=[{**asdict(g.estimate), "fits": g.estimate.fits} for g in groups.values()],
        **estimates_to_dict(table_est, rank_est),
    )
    (run_dir / "plan.txt").write_text(report + "\n")
    plot_rank_memory(
        rank_est,
        run_dir / "memory.png",
        title=f"{cfg.model.arch}: estimated memory per rank, {world_size} x {compute_device}"
        + (f" (one of {replicas} groups)" if replicas > 1 else ""),
    )
    return ClusterPlan(
        report=report,
        run_dir=run_dir,
        peak_hbm_bytes=max(r.hbm_used_bytes for r in rank_est),
        peak_ddr_bytes=max(r.ddr_used_bytes for r in rank_est),
        plan_time_s=capture.run_time_s,
        replicas=replicas,
        replica_estimates=[g.estimate for g in groups.values()],
    )


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(dict_cfg: DictConfig) -> None:
    quiet_libraries(level=logging.ERROR)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = plan_cluster(to_config(dict_cfg), run_dir=run_dir)
    except ConfigError as err:
        print(config_error_line(err), file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except DoesNotFit as err:
        print(f"shardrec: does not fit: {err}", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    print(result.report)
    print(f"\nwrote {run_dir / 'plan.json'}, plan.txt, memory.png")


def main() -> None:
    """Runs the Hydra app (``python -m trainer.plan`` has checked the command line)."""
    _run()
