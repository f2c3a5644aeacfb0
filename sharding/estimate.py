"""Per-table and per-rank memory and cost, read from the planner's own estimates.

torchrec's planner gives every shard of the chosen plan a ``storage``
(HBM and DDR bytes: weights, optimizer state, input/output buffers) and a
``perf`` (estimated forward/backward compute and comms, in ms). These are the
numbers it packed against the topology's caps; here they are summed per table
and per rank, without any model of our own.

Example::

    capture = PlanCapture()
    plan = plan_sharding(model, ..., pg=None, stats=[capture])
    ranks = rank_estimates(capture.best_plan, capture.topology,
                           storage_reservation_percentage=0.15)
    print(max(r.hbm_used_bytes for r in ranks))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchrec.distributed.planner.types import ShardingOption, Stats, Topology


class PlanCapture(Stats):
    """A planner ``Stats`` hook that keeps the chosen sharding options.

    The planner calls every ``Stats`` once with its best plan: shards with
    ranks, storage and perf. Passing this one (instead of torchrec's logged
    report) is how a caller gets those numbers without private attributes.
    """

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.topology: Topology | None = None
        self.run_time_s: float = 0.0
        self.num_proposals: int = 0

    def log(
        self,
        sharding_plan: Any,
        topology: Topology,
        batch_size: int,
        storage_reservation: Any,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: list[ShardingOption],
        **kwargs: Any,
    ) -> None:
        if not sharding_plan.plan:  # no plan: best_plan is the last failed proposal
            return
        self.topology = topology
        self.best_plan = list(best_plan)
        self.run_time_s = run_time
        self.num_proposals = num_proposals


@dataclass(frozen=True)
class TableEstimate:
    name: str
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    num_embeddings: int
    embedding_dim: int
    hbm_bytes: int  # summed over shards (replicas included)
    ddr_bytes: int
    cost_ms: float  # summed over shards


@dataclass(frozen=True)
class RankEstimate:
    rank: int
    num_shards: int
    hbm_used_bytes: int
    ddr_used_bytes: int
    hbm_cap_bytes: int
    ddr_cap_bytes: int
    # What the planner packed against: the cap less the storage reservation
    # (kept for dense parameters, activations and input batches).
    hbm_budget_bytes: int
    ddr_budget_bytes: int
    fwd_compute_ms: float
    fwd_comms_ms: float
    bwd_compute_ms: float
    bwd_comms_ms: float

    @property
    def cost_ms(self) -> float:
        return self.fwd_compute_ms + self.fwd_comms_ms + self.bwd_compute_ms + self.bwd_comms_ms


def table_estimates(best_plan: list[ShardingOption]) -> list[TableEstimate]:
    """One entry per table, in plan order."""
    out = []
    for option in best_plan:
        shards = option.shards
        out.append(
            TableEstimate(
                name=option.name,
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                ranks=[int(s.rank) for s in shards if s.rank is not None],
                num_embeddings=int(option.tensor.shape[0]),
                embedding_dim=int(option.tensor.shape[1]),
                hbm_bytes=sum(s.storage.hbm for s in shards if s.storage),
                ddr_bytes=sum(s.storage.ddr for s in shards if s.storage),
                cost_ms=sum(s.perf.total for s in shards if s.perf),
            )
        )
    return out


def rank_estimates(
    best_plan: list[ShardingOption],
    topology: Topology,
    *,
    storage_reservation_percentage: float,
) -> list[RankEstimate]:
    """Per rank: the shards' storage and perf summed, beside the device's caps."""
    sums: list[dict[str, float]] = [
        dict.fromkeys(("shards", "hbm", "ddr", "fc", "fm", "bc", "bm"), 0)
        for _ in range(topology.world_size)
    ]
    for option in best_plan:
        for shard in option.shards:
            acc = sums[int(shard.rank)]  # type: ignore[arg-type]
            acc["shards"] += 1
            if shard.storage:
                acc["hbm"] += shard.storage.hbm
                acc["ddr"] += shard.storage.ddr
            if shard.perf:
                acc["fc"] += shard.perf.fwd_compute
                acc["fm"] += shard.perf.fwd_comms
                acc["bc"] += shard.perf.bwd_compute
                acc["bm"] += shard.perf.bwd_comms
    out = []
    for rank, (acc, device) in enumerate(zip(sums, topology.devices, strict=True)):
        hbm_cap, ddr_cap = device.storage.hbm, device.storage.ddr
        out.append(
            RankEstimate(
                rank=rank,
                num_shards=int(acc["shards"]),
                hbm_used_bytes=int(acc["hbm"]),
                ddr_used_bytes=int(acc["ddr"]),
                hbm_cap_bytes=hbm_cap,
                ddr_cap_bytes=ddr_cap,
                # torchrec's FixedPercentageStorageReservation shrinks HBM only.
                hbm_budget_bytes=int((1 - storage_reservation_percentage) * hbm_cap),
                ddr_budget_bytes=ddr_cap,
                fwd_compute_ms=acc["fc"],
                fwd_comms_ms=acc["fm"],
                bwd_compute_ms=acc["bc"],
                bwd_comms_ms=acc["bm"],
            )
        )
    return out
