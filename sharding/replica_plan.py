"""Planning 2D sparse parallelism: one group's plan, costed for the whole world.

With ``sharding.replicas=K`` the planner plans one group of G = W / K ranks
(the per-rank batch unchanged, so a group serves 1/K of the global batch); the
K groups are copies of it. Two layouts (``sharding.replica_layout``), both
torchrec ``DMPCollection``'s:

- ``interleaved`` (torchrec's default): group ``g`` is global ranks
  ``g, g + K, ...``; a host of L ranks holds L / K ranks of every group, so a
  group spans every host and the K copies of a shard sit in one host (the
  replica sync runs at intra-host bandwidth). A group's planner sees hosts of
  L / K ranks: per rank, the tables' share of the group batch is that of
  N / L hosts whatever K is, which is why K barely helps in this layout.
- ``hosts`` (torchrec's ``use_inter_host_allreduce=True``): group ``g`` is
  the whole hosts ``g * G / L ...``, i.e. ranks ``g * G .. (g + 1) * G - 1``;
  each group is a world of G / L hosts of L ranks, planned as such, and the
  replica sync crosses hosts (inter-host bandwidth).

Per rank, for the whole world:

- embedding cost: the planner's fwd + bwd estimate of the group plan (the same
  on every copy);
- sync: what :class:`sharding.replicas.ReplicaSync` all-reduces over the K
  copies, a ring all-reduce ``2 (K - 1) / K * bytes / bandwidth``, once every
  ``sync_every`` steps and shown per step (the mean; ``sync_once_ms`` is the
  step that syncs): every step (``sync_every=1``) the rank's rows' gradients
  in the table dtype; every N > 1 steps the rows' change since the last sync
  plus the row-wise Adagrad accumulators' change (4 bytes a row);
- HBM: the planner's estimate plus the sync's copy of the rank's rows and
  accumulators (K > 1 only).

``replicas=auto`` tries every K of :func:`replica_candidates` and keeps the
lowest peak of embedding cost + sync among those that fit.

Example::

    est = estimate_replicas(capture.best_plan, ranks, replicas=4, world_size=1024,
                            sync_bw_bytes_per_ms=12.5 * 1024**3 / 1000, layout="hosts",
                            sync_every=100)
    print(format_replica_table([est]))
"""

from __future__ import annotations

from dataclasses import dataclass

from torchrec.distributed.planner.types import ShardingOption

from sharding.estimate import RankEstimate
from sharding.report import format_bytes

LAYOUTS = ("interleaved", "hosts")


def check_layout(layout: str) -> str:
    """``sharding.replica_layout`` checked; ValueError names the choices."""
    if layout not in LAYOUTS:
        raise ValueError(f"sharding.replica_layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def replica_candidates(
    world_size: int, local_world_size: int, layout: str = "interleaved"
) -> list[int]:
    """The K ``auto`` tries. interleaved: K dividing the ranks per host and the world
    (whole copies inside a host); hosts: K dividing the number of hosts (whole hosts
    per group)."""
    if check_layout(layout) == "hosts":
        hosts = world_size // local_world_size if world_size % local_world_size == 0 else 1
        return [k for k in range(1, hosts + 1) if hosts % k == 0]
    return [
        k
        for k in range(1, local_world_size + 1)
        if local_world_size % k == 0 and world_size % k == 0
    ]


def group_shape(
    world_size: int, local_world_size: int, replicas: int, layout: str
) -> tuple[int, int]:
    """(ranks, ranks per host) of one group; ValueError if ``hosts`` cannot cut whole hosts."""
    group = world_size // replicas
    if check_layout(layout) == "hosts":
        if group % local_world_size:
            raise ValueError(
                f"sharding.replica_layout=hosts needs whole hosts per group: "
                f"{world_size} ranks / replicas {replicas} = {group} is not a multiple of "
                f"{local_world_size} ranks per host; pick K dividing the "
                f"{world_size // local_world_size} hosts, or replica_layout=interleaved"
            )
        return group, local_world_size
    return group, max(1, local_world_size // replicas)


def rank_rows_bytes(best_plan: list[ShardingOption], group_size: int) -> list[tuple[int, int]]:
    """Per group rank: (bytes of its shard rows, bytes of their row-wise accumulators)."""
    out = [[0, 0] for _ in range(group_size)]
    for option in best_plan:
        if option.sharding_type == "data_parallel":
            continue  # replicated dense parameters: DDP averages them, no sync
        element = option.tensor.element_size()
        for shard in option.shards:
            if shard.rank is None:
                continue
            rows, cols = int(shard.size[0]), int(shard.size[1])
            out[int(shard.rank)][0] += rows * cols * element
            out[int(shard.rank)][1] += rows * 4
    return [(a, b) for a, b in out]


@dataclass(frozen=True)
class ReplicaEstimate:
    replicas: int
    world_size: int
    group_size: int
    group_local_world_size: int
    peak_cost_ms: float  # planner's embedding fwd + bwd, busiest rank
    peak_sync_ms: float  # replica all-reduce per step (mean over sync_every steps)
    peak_total_ms: float  # max over ranks of cost + sync per step
    ranks_with_tables: int  # in the whole world
    peak_hbm_bytes: int  # planner's estimate + the sync's copy
    hbm_budget_bytes: int
    plan_time_s: float = 0.0
    layout: str = "interleaved"
    sync_every: int = 1
    sync_once_ms: float = 0.0  # one sync of the busiest-syncing rank (the syncing step's extra)

    @property
    def fits(self) -> bool:
        return self.peak_hbm_bytes <= self.hbm_budget_bytes

    @property
    def share_with_tables(self) -> float:
        return self.ranks_with_tables / self.world_size


def sync_ms(num_bytes: int, replicas: int, bw_bytes_per_ms: float) -> float:
    """Ring all-reduce of ``num_bytes`` over ``replicas`` ranks."""
    if replicas == 1 or num_bytes == 0:
        return 0.0
    return 2 * (replicas - 1) / replicas * num_bytes / bw_bytes_per_ms


def synced_bytes(rows_bytes: int, acc_bytes: int, sync_every: int) -> int:
    """Bytes ReplicaSync all-reduces per sync: gradients of the rows (every step), or
    the change of rows and accumulators since the last sync (every N > 1 steps)."""
    return rows_bytes if sync_every == 1 else rows_bytes + acc_bytes


def estimate_replicas(
    best_plan: list[ShardingOption],
    ranks: list[RankEstimate],
    *,
    replicas: int,
    world_size: int,
    group_local_world_size: int = 1,
    sync_bw_bytes_per_ms: float,
    layout: str = "interleaved",
    sync_every: int = 1,
    plan_time_s: float = 0.0,
) -> ReplicaEstimate:
    """The world's figures from one group's plan (``ranks``: the group's estimates)."""
    if sync_every < 1:
        raise ValueError(f"sharding.replica_sync_every={sync_every} must be >= 1")
    rows = rank_rows_bytes(best_plan, len(ranks))
    once = [
        sync_ms(synced_bytes(w, a, sync_every), replicas, sync_bw_bytes_per_ms) for w, a in rows
    ]
    syncs = [s / sync_every for s in once]
    copies = [(w + a) if replicas > 1 else 0 for w, a in rows]
    peak_hbm = max(r.hbm_used_bytes + c for r, c in zip(ranks, copies, strict=True))
    return ReplicaEstimate(
        replicas=replicas,
        world_size=world_size,
        group_size=len(ranks),
        group_local_world_size=group_local_world_size,
        peak_cost_ms=max(r.cost_ms for r in ranks),
        peak_sync_ms=max(syncs),
        peak_total_ms=max(r.cost_ms + s for r, s in zip(ranks, syncs, strict=True)),
        ranks_with_tables=replicas * sum(1 for r in ranks if r.num_shards > 0),
        peak_hbm_bytes=peak_hbm,
        hbm_budget_bytes=min(r.hbm_budget_bytes for r in ranks),
        plan_time_s=plan_time_s,
        layout=layout,
        sync_every=sync_every,
        sync_once_ms=max(once),
    )


def pick_replicas(estimates: list[ReplicaEstimate]) -> ReplicaEstimate:
    """The lowest peak of embedding cost + sync that fits (the smallest K on a tie)."""
    fitting = [e for e in estimates if e.fits] or estimates
    return min(fitting, key=lambda e: (round(e.peak_total_ms, 3), e.replicas))


def format_replica_table(estimates: list[ReplicaEstimate], chosen: int | None = None) -> str:
    """One line per K: group, embedding cost, sync, total, ranks holding tables, HBM."""
    lines = [
        f"{'K':>4} {'layout':>11} {'group':>6} {'emb ms':>8} {'sync ms':>8} {'total ms':>9} "
        f"{'one sync':>9} {'ranks with tables':>19} {'peak HBM':>11} {'budget':>10} fits"
    ]
    for e in estimates:
        mark = "  <- chosen" if e.replicas == chosen else ""
        share = f"{e.ranks_with_tables}/{e.world_size} {100 * e.share_with_tables:3.0f}%"
        lines.append(
            f"{e.replicas:>4} {e.layout:>11} {e.group_size:>6} {e.peak_cost_ms:8.3f} "
            f"{e.peak_sync_ms:8.3f} {e.peak_total_ms:9.3f} {e.sync_once_ms:9.2f} {share:>19} "
            f"{format_bytes(e.peak_hbm_bytes):>11} {format_bytes(e.hbm_budget_bytes):>10} "
            f"{'yes' if e.fits else 'no'}{mark}"
        )
    if estimates and estimates[0].sync_every > 1:
        lines.append(f"(sync every {estimates[0].sync_every} steps; sync ms is per step)")
    return "\n".join(lines)
