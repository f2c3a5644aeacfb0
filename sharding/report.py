"""The plan as data: a JSON-able dict, a table for the console, and ``plan.json``.

Example::

    print(format_plan(plan))
    save_plan(plan, run_dir / "plan.json", table_bytes={"t_cat_0": 64_000})
    print(format_estimates(tables, ranks))   # sharding.estimate's per-table/rank sums
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torchrec.distributed.types import ShardingPlan

from sharding.estimate import RankEstimate, TableEstimate


def _shards(param_sharding: Any) -> list[dict[str, Any]]:
    spec = param_sharding.sharding_spec
    if spec is None or not hasattr(spec, "shards"):
        return []
    return [
        {
            "rank": shard.placement.rank() if shard.placement else None,
            "offsets": list(shard.shard_offsets),
            "sizes": list(shard.shard_sizes),
        }
        for shard in spec.shards
    ]


def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """``{module_path: {table: {sharding_type, compute_kernel, ranks, shards}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        out[module_path] = {
            table: {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": _shards(ps),
                # UVM caching: the share of the table's rows cached in HBM.
                **(
                    {"cache_load_factor": ps.cache_params.load_factor}
                    if ps.cache_params is not None and ps.cache_params.load_factor is not None
                    else {}
                ),
            }
            for table, ps in module_plan.items()  # type: ignore[union-attr]
        }
    return out


def format_plan(plan: ShardingPlan) -> str:
    """One line per table: strategy, kernel, and which ranks hold which rows/cols."""
    lines = [f"{'table':<24} {'strategy':<14} {'kernel':<8} ranks / shards (rows x cols)"]
    for tables in plan_to_dict(plan).values():
        for name, entry in tables.items():
            shards = (
                ", ".join(f"r{s['rank']}:{s['sizes'][0]}x{s['sizes'][1]}" for s in entry["shards"])
                or f"replicated on {entry['ranks']}"
            )
            lines.append(
                f"{name:<24} {entry['sharding_type']:<14} {entry['compute_kernel']:<8} {shards}"
            )
    return "\n".join(lines)


def save_plan(plan: ShardingPlan, path: Path, **extra: Any) -> Path:
    """Writes ``plan.json``: the plan plus any extra context (world size, strategy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "plan": plan_to_dict(plan)}, indent=2))
    return path


def format_bytes(num_bytes: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``0 B``: binary units, as torchrec's planner uses."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def format_ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``0-3,8``."""
    spans: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _used(used: int, cap: int) -> str:
    share = f"{100 * used / cap:5.1f}%" if cap else "     -"
    return f"{format_bytes(used):>11} / {format_bytes(cap):>10} {share}"


def format_estimates(tables: list[TableEstimate], ranks: list[RankEstimate]) -> str:
    """Per table: strategy, kernel, ranks, bytes. Per rank: memory against caps, cost."""
    name_w = max([5, *(len(t.name) for t in tables)])
    lines = [
        f"{'table':<{name_w}} {'strategy':<15} {'kernel':<7} {'ranks':<12} "
        f"{'rows x dim':>17} {'HBM':>11} {'DDR':>11} {'cost ms':>8}"
    ]
    for t in tables:
        lines.append(
            f"{t.name:<{name_w}} {t.sharding_type:<15} {t.compute_kernel:<7} "
            f"{format_ranks(t.ranks):<12} {f'{t.num_embeddings:,} x {t.embedding_dim}':>17} "
            f"{format_bytes(t.hbm_bytes):>11} {format_bytes(t.ddr_bytes):>11} {t.cost_ms:8.3f}"
        )
    lines += [
        "",
        f"{'rank':>4} {'shards':>6}  {'HBM used / cap':>30}  {'DDR used / cap':>30}  "
        f"{'cost ms':>8}  (fwd compute, fwd comms, bwd compute, bwd comms)",
    ]
    for r in ranks:
        lines.append(
            f"{r.rank:>4} {r.num_shards:>6}  {_used(r.hbm_used_bytes, r.hbm_cap_bytes)}  "
            f"{_used(r.ddr_used_bytes, r.ddr_cap_bytes)}  {r.cost_ms:8.3f}  "
            f"({r.fwd_compute_ms:.3f}, {r.fwd_comms_ms:.3f}, "
            f"{r.bwd_compute_ms:.3f}, {r.bwd_comms_ms:.3f})"
        )
    lines += ["", format_peaks(ranks)]
    return "\n".join(lines)


def format_peaks(ranks: list[RankEstimate]) -> str:
    """The busiest rank for HBM, DDR and estimated cost, in one line each."""
    hbm = max(ranks, key=lambda r: r.hbm_used_bytes)
    ddr = max(ranks, key=lambda r: r.ddr_used_bytes)
    cost = max(ranks, key=lambda r: r.cost_ms)
    return "\n".join(
        [
            f"peak HBM  {format_bytes(hbm.hbm_used_bytes)} on rank {hbm.rank} "
            f"(planner budget {format_bytes(hbm.hbm_budget_bytes)} of "
            f"{format_bytes(hbm.hbm_cap_bytes)})",
            f"peak DDR  {format_bytes(ddr.ddr_used_bytes)} on rank {ddr.rank} "
            f"(cap {format_bytes(ddr.ddr_cap_bytes)})",
            f"peak cost {cost.cost_ms:.3f} ms on rank {cost.rank} "
            f"(planner's estimate of embedding fwd + bwd per step)",
        ]
    )


def estimates_to_dict(
    tables: list[TableEstimate], ranks: list[RankEstimate]
) -> dict[str, list[dict[str, Any]]]:
    """The per-table and per-rank estimates, JSON-able, for ``save_plan(**extra)``."""
    return {
        "tables": [asdict(t) for t in tables],
        "ranks": [{**asdict(r), "cost_ms": r.cost_ms} for r in ranks],
    }
