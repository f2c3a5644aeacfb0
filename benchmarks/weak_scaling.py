"""Weak scaling of the planned embedding cost: today's planner (K = 1) against 2D (K auto).

For each world size N it runs what ``python -m trainer.plan experiment=mlperf_dcnv2
topology.local_world_size=8 topology.hbm_gb=80 trainer.batch_size=864
topology.world_size=N sharding.replicas=auto`` runs (in this process), whose
table of K holds K = 1 (today's plan) and every other K; then writes the table
and a plot to ``docs/scaling.md`` and ``docs/scaling.png``.

Example::

    python -m benchmarks.weak_scaling                       # N = 64, 256, 1024, 2048
    python -m benchmarks.weak_scaling --worlds 64 256 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sharding.quiet import quiet_libraries
from sharding.replica_plan import ReplicaEstimate, pick_replicas
from sharding.report import format_bytes
from trainer.config.compose import CONF_DIR
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs, to_config
from trainer.plan.cluster import plan_cluster

WORLDS = (64, 256, 1024, 2048)
BASE = [
    "experiment=mlperf_dcnv2",
    "topology.local_world_size=8",
    "topology.hbm_gb=80",
    "trainer.batch_size=864",
]


def plan_world(world_size: int) -> list[ReplicaEstimate]:
    """Every K's estimate for one world size (K = 1 first)."""
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    overrides = [*BASE, f"topology.world_size={world_size}", "sharding.replicas=auto"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as run_dir:
        return plan_cluster(cfg, run_dir=Path(run_dir)).replica_estimates


def _row(n: int, e: ReplicaEstimate) -> str:
    share = f"{e.ranks_with_tables}/{n} ({100 * e.share_with_tables:.0f}%)"
    return (
        f"| {n} | {e.replicas} | {e.group_size} | {e.peak_cost_ms:.2f} | {e.peak_sync_ms:.2f} | "
        f"{e.peak_total_ms:.2f} | {share} | {format_bytes(e.peak_hbm_bytes)} |"
    )


def write_page(results: dict[int, list[ReplicaEstimate]], out: Path, elapsed_s: float) -> None:
    """``out``.md (tables, commands, machine) and ``out``.png (cost against N)."""
    base = {n: next(e for e in es if e.replicas == 1) for n, es in results.items()}
    best = {n: pick_replicas(es) for n, es in results.items()}
    head = (
        "| N | K | group | emb ms | sync ms | emb + sync ms | ranks with tables | "
        "peak HBM |\n|---|---|---|---|---|---|---|---|"
    )
    ref = 256 if 256 in best else min(best)
    lines = [
        "# Weak scaling of the planned embedding cost",
        "",
        f"Generated {datetime.date.today()} by `python -m benchmarks.weak_scaling` on "
        f"{platform.node() or 'a CPU machine'} ({platform.machine()}, "
        f"{platform.python_version()}), planning only (no GPU): {elapsed_s / 60:.0f} min.",
        "Each world size N is",
        "",
        "    python -m trainer.plan experiment=mlperf_dcnv2 topology.local_world_size=8 \\",
        "        topology.hbm_gb=80 trainer.batch_size=864 topology.world_size=N "
        "sharding.replicas=auto",
        "",
        "(batch 864 per rank at every N). K = 1 is today's planner; `sharding.replicas=auto`",
        "plans one group of N/K ranks for every K dividing the 8 ranks per host and keeps the",
        "lowest peak of embedding cost + replica sync that fits 80 GB (sharding/replica_plan.py).",
        "`emb ms` is torchrec's estimate of embedding fwd + bwd on the busiest rank; `sync ms`",
        "the replica sync (a ring all-reduce of the rank's rows inside its host, 600 GB/s,",
        "every step; not in torchrec's estimate); HBM adds the sync's copy of the rows.",
        "",
        "## Today (K = 1) against the chosen K",
        "",
        head,
    ]
    for n in results:
        lines += [_row(n, base[n]), _row(n, best[n])]
    lines += ["", f"Ratio to N = {ref} (emb + sync of the chosen K):", ""]
    for n in results:
        lines.append(
            f"- N = {n}: K = 1 {base[n].peak_total_ms / base[ref].peak_total_ms:.2f}x, "
            f"chosen K = {best[n].replicas}: "
            f"{best[n].peak_total_ms / best[ref].peak_total_ms:.2f}x"
        )
    lines += ["", "## Every K", "", head]
    for n, es in results.items():
        lines += [_row(n, e) for e in es]
    lines += ["", "![cost against world size](scaling.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ns = list(results)
    ax.plot(ns, [base[n].peak_total_ms for n in ns], "o-", label="K = 1 (today)")
    ax.plot(ns, [best[n].peak_total_ms for n in ns], "s-", label="replicas=auto (emb + sync)")
    ax.plot(ns, [best[n].peak_cost_ms for n in ns], "s--", label="replicas=auto (emb only)")
    for n in ns:
        ax.annotate(f"K={best[n].replicas}", (n, best[n].peak_total_ms), fontsize=8)
    ax.set(xscale="log", xlabel="GPUs (864 samples each)", ylabel="peak ms per step")
    ax.set_title("planned embedding cost per rank")
    ax.legend()
    ax2.plot(ns, [100 * base[n].share_with_tables for n in ns], "o-", label="K = 1")
    ax2.plot(ns, [100 * best[n].share_with_tables for n in ns], "s-", label="replicas=auto")
    ax2.set(xscale="log", xlabel="GPUs", ylabel="% of ranks holding tables", ylim=(0, 105))
    ax2.legend()
    FigureCanvasAgg(fig).print_png(str(out.with_suffix(".png")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    parser.add_argument("--out", type=Path, default=Path("docs/scaling"))
    args = parser.parse_args()
    quiet_libraries(level=logging.ERROR)
    start = time.monotonic()
    results = {}
    for n in args.worlds:
        results[n] = plan_world(n)
        costs = ", ".join(f"K={e.replicas} {e.peak_total_ms:.2f} ms" for e in results[n])
        print(f"N={n}: {costs}", flush=True)
    write_page(results, args.out, time.monotonic() - start)
    print(f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
