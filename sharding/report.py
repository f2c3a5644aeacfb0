"""The plan as data: a JSON-able dict, a table for the console, and ``plan.json``.

Example::

    print(format_plan(plan))
    save_plan(plan, run_dir / "plan.json", table_bytes={"t_cat_0": 64_000})
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchrec.distributed.types import ShardingPlan


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
            }
            for table, ps in module_plan.items()  # type: ignore[union-attr]
        }
    return out


def format_plan(plan: ShardingPlan) -> str:
    """One line per table: strategy, kernel, and which ranks hold which rows/cols."""
    lines = [f"{'table':<24} {'strategy':<14} {'kernel':<8} ranks / shards (rows x cols)"]
    for tables in plan_to_dict(plan).values():
        for name, entry in tables.items():
            shards = ", ".join(
                f"r{s['rank']}:{s['sizes'][0]}x{s['sizes'][1]}" for s in entry["shards"]
            ) or f"replicated on {entry['ranks']}"
            lines.append(
                f"{name:<24} {entry['sharding_type']:<14} "
                f"{entry['compute_kernel']:<8} {shards}"
            )
    return "\n".join(lines)


def save_plan(plan: ShardingPlan, path: Path, **extra: Any) -> Path:
    """Writes ``plan.json``: the plan plus any extra context (world size, strategy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "plan": plan_to_dict(plan)}, indent=2))
    return path
