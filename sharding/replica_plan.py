"""Planning 2D sparse parallelism: one group's plan, costed for the whole world.

With ``sharding.replicas=K`` the planner plans one group of G = W / K ranks
(the per-rank batch unchanged, so a group serves 1/K of the global batch); the
K groups are copies of it (``sharding.replicas``: group ``g`` is global ranks
``g, g + K, ...``, so a host of L ranks holds L / K ranks of each group and
the K copies of a shard sit in one host). Per rank, for the whole world:

- embedding cost: the planner's fwd + bwd estimate of the group plan (the same
  on every copy);
- sync: the replica sync all-reduces the rank's rows (their gradient, in the
  table dtype) over the K copies inside the host, every step: a ring
  all-reduce, ``2 (K - 1) / K * bytes / intra-host bandwidth``;
- HBM: the planner's estimate plus the sync's copy of the rank's rows and
  row-wise Adagrad accumulators (K > 1 only).

``replicas=auto`` tries every K that divides the ranks per host (and the
world) and keeps the lowest peak of embedding cost + sync among those that fit.

Example::

    est = estimate_replicas(capture.best_plan, ranks, replicas=4, world_size=1024,
                            intra_host_bw_bytes_per_ms=600 * 1024**3 / 1000)
    print(format_replica_table([est]))
"""

from __future__ import annotations

from dataclasses import dataclass

from torchrec.distributed.planner.types import ShardingOption

from sharding.estimate import RankEstimate
from sharding.report import format_bytes


def replica_candidates(world_size: int, local_world_size: int) -> list[int]:
    """K that keep whole copies inside a host: divisors of the ranks per host and the world."""
    return [
        k
        for k in range(1, local_world_size + 1)
        if local_world_size % k == 0 and world_size % k == 0
    ]


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
    peak_sync_ms: float  # replica all-reduce of the busiest-syncing rank
    peak_total_ms: float  # max over ranks of cost + sync
    ranks_with_tables: int  # in the whole world
    peak_hbm_bytes: int  # planner's estimate + the sync's copy
    hbm_budget_bytes: int
    plan_time_s: float = 0.0

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


def estimate_replicas(
    best_plan: list[ShardingOption],
    ranks: list[RankEstimate],
    *,
    replicas: int,
    world_size: int,
    group_local_world_size: int = 1,
    intra_host_bw_bytes_per_ms: float,
    plan_time_s: float = 0.0,
) -> ReplicaEstimate:
    """The world's figures from one group's plan (``ranks``: the group's estimates)."""
    rows = rank_rows_bytes(best_plan, len(ranks))
    syncs = [sync_ms(w, replicas, intra_host_bw_bytes_per_ms) for w, _ in rows]
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
    )


def pick_replicas(estimates: list[ReplicaEstimate]) -> ReplicaEstimate:
    """The lowest peak of embedding cost + sync that fits (the smallest K on a tie)."""
    fitting = [e for e in estimates if e.fits] or estimates
    return min(fitting, key=lambda e: (round(e.peak_total_ms, 3), e.replicas))


def format_replica_table(estimates: list[ReplicaEstimate], chosen: int | None = None) -> str:
    """One line per K: group, embedding cost, sync, total, ranks holding tables, HBM."""
    lines = [
        f"{'K':>3} {'group':>6} {'emb ms':>8} {'sync ms':>8} {'total ms':>9} "
        f"{'ranks with tables':>19} {'peak HBM':>11} {'budget':>10} fits"
    ]
    for e in estimates:
        mark = "  <- chosen" if e.replicas == chosen else ""
        share = f"{e.ranks_with_tables}/{e.world_size} {100 * e.share_with_tables:3.0f}%"
        lines.append(
            f"{e.replicas:>3} {e.group_size:>6} {e.peak_cost_ms:8.3f} {e.peak_sync_ms:8.3f} "
            f"{e.peak_total_ms:9.3f} {share:>19} {format_bytes(e.peak_hbm_bytes):>11} "
            f"{format_bytes(e.hbm_budget_bytes):>10} {'yes' if e.fits else 'no'}{mark}"
        )
    return "\n".join(lines)
