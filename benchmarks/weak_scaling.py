"""Weak scaling of the planned embedding cost: today's planner (K = 1) against 2D replicas.

For each world size N and each sync interval S it runs what ``python -m trainer.plan
experiment=mlperf_dcnv2 topology.local_world_size=8 topology.hbm_gb=80
trainer.batch_size=864 topology.world_size=N sharding.replicas=auto
sharding.replica_layout=LAYOUT sharding.replica_sync_every=S`` runs (in this
process), whose table of K holds K = 1 (today's plan) and every other K; then
writes the tables and a plot to ``docs/scaling.md`` and ``docs/scaling.png``.
A group's plan depends only on its ranks and ranks per host, so each is planned
once and shared by every N, K, layout and S that has it (``plan_cluster``'s
``group_cache``).

Example::

    python -m benchmarks.weak_scaling                        # N = 64 .. 2048, both layouts
    python -m benchmarks.weak_scaling --worlds 64 256 --layouts hosts --out /tmp/scaling
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
from sharding.replica_plan import ReplicaEstimate, estimate_replicas, pick_replicas
from sharding.report import format_bytes
from trainer.config.compose import CONF_DIR
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs, to_config
from trainer.plan.cluster import GroupPlan, plan_cluster, sync_bandwidth

WORLDS = (64, 256, 1024, 2048)
EVERY = (1, 10, 100, 200)
LAYOUTS = ("hosts", "interleaved")
REF = 256  # the target: peak at 1,024 and 2,048 <= 1.25x the peak at 256
BASE = [
    "experiment=mlperf_dcnv2",
    "topology.local_world_size=8",
    "topology.hbm_gb=80",
    "trainer.batch_size=864",
]
NOTES = "<!-- notes: kept by benchmarks/weak_scaling.py -->"
Key = tuple[str, int, int]  # layout, sync every, N
Results = dict[Key, list[ReplicaEstimate]]


def plan_world(
    world_size: int,
    *,
    layout: str = "hosts",
    every: tuple[int, ...] = (1,),
    cache: dict[tuple[int, int], GroupPlan] | None = None,
) -> dict[int, list[ReplicaEstimate]]:
    """Every K's estimate for one world size (K = 1 first), per sync interval: planned
    once through ``plan_cluster`` (interval ``every[0]``), the other intervals costed
    from the same group plans with :func:`estimate_replicas`, as ``plan_cluster`` does."""
    cache = {} if cache is None else cache
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    overrides = [
        *BASE,
        f"topology.world_size={world_size}",
        "sharding.replicas=auto",
        f"sharding.replica_layout={layout}",
        f"sharding.replica_sync_every={every[0]}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as run_dir:
        first = plan_cluster(cfg, run_dir=Path(run_dir), group_cache=cache).replica_estimates
    out = {every[0]: first}
    for s in every[1:]:
        out[s] = []
        for e in first:
            group = cache[e.group_size, e.group_local_world_size]
            out[s].append(
                estimate_replicas(
                    group.capture.best_plan,
                    group.ranks,
                    replicas=e.replicas,
                    world_size=e.world_size,
                    group_local_world_size=e.group_local_world_size,
                    sync_bw_bytes_per_ms=sync_bandwidth(cfg),
                    layout=e.layout,
                    sync_every=s,
                    plan_time_s=e.plan_time_s,
                )
            )
    return out


HEAD = (
    "| N | layout | sync every | K | group | emb ms | sync ms/step | one sync ms | total ms "
    "| vs 256 | ranks with tables | peak HBM |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(e: ReplicaEstimate, ref: float) -> str:
    n = e.world_size
    share = f"{e.ranks_with_tables}/{n} ({100 * e.share_with_tables:.0f}%)"
    return (
        f"| {n} | {e.layout} | {e.sync_every} | {e.replicas} | {e.group_size} | "
        f"{e.peak_cost_ms:.2f} | {e.peak_sync_ms:.2f} | {e.sync_once_ms:.1f} | "
        f"{e.peak_total_ms:.2f} | {e.peak_total_ms / ref:.2f}x | {share} | "
        f"{format_bytes(e.peak_hbm_bytes)}{'' if e.fits else ' (does not fit)'} |"
    )


def summary(results: Results) -> tuple[float, list[str]]:
    """The K = 1 reference at N = 256 and one row per (layout, S, N): today, then chosen K."""
    worlds = sorted({n for _, _, n in results})
    ref_n = REF if REF in worlds else min(worlds)
    today = {
        n: next(e for k, es in results.items() if k[2] == n for e in es if e.replicas == 1)
        for n in worlds
    }
    ref = today[ref_n].peak_total_ms
    rows = [_row(today[n], ref).replace(f"| {today[n].layout} |", "| (K = 1) |", 1) for n in worlds]
    rows += [_row(pick_replicas(es), ref) for _, es in sorted(results.items())]
    return ref, rows


def target_lines(results: Results) -> list[str]:
    """Per (layout, S): the chosen K's peak at 1,024 and 2,048 over its own peak at 256."""
    out = []
    for layout, every in sorted({(k[0], k[1]) for k in results}):
        best = {
            n: pick_replicas(es)
            for (lay, ev, n), es in results.items()
            if (lay, ev) == (layout, every)
        }
        if REF not in best:
            continue
        ref = best[REF]
        parts = []
        for n in sorted(best):
            if n > REF:
                e = best[n]
                ratio = e.peak_total_ms / ref.peak_total_ms
                parts.append(f"N = {n}: {ratio:.2f}x, {100 * e.share_with_tables:.0f}% of ranks")
        met = all(
            best[n].peak_total_ms <= 1.25 * ref.peak_total_ms and best[n].share_with_tables >= 0.9
            for n in best
            if n > REF
        )
        out.append(
            f"- {layout}, sync every {every}: N = 256 {ref.peak_total_ms:.2f} ms "
            f"(K = {ref.replicas}); "
            + "; ".join(parts)
            + f" -> target {'met' if met else 'missed'}"
        )
    return out


def write_page(results: Results, out: Path, elapsed_s: float, intro: list[str]) -> None:
    """``out``.md (tables, commands, machine) and ``out``.png (cost against N)."""
    ref, rows = summary(results)
    lines = [
        "# Weak scaling of the planned embedding cost",
        "",
        f"Generated {datetime.date.today()} by `python -m benchmarks.weak_scaling` on "
        f"{platform.node() or 'a CPU machine'} ({platform.machine()}, "
        f"{platform.python_version()}), planning only (no GPU): {elapsed_s / 60:.0f} min.",
        *intro,
        "",
        "## Today (K = 1) against the chosen K",
        "",
        f"`vs 256`: total over today's (K = 1) total at N = 256 ({ref:.2f} ms).",
        "",
        HEAD,
        *rows,
        "",
        "The target (peak at 1,024 and 2,048 <= 1.25x the peak at 256, >= 90% of ranks "
        "holding table shards), each setting against its own N = 256:",
        "",
        *target_lines(results),
        "",
        "## Every K",
        "",
        HEAD,
    ]
    for (_layout, _every, _n), es in sorted(results.items()):
        lines += [_row(e, ref) for e in es]
    lines += ["", "![cost against world size](scaling.png)", ""]
    page = out.with_suffix(".md")
    old = page.read_text() if page.exists() else ""
    if NOTES in old:  # hand-written notes below the marker survive a re-run
        lines += [NOTES + old.split(NOTES, 1)[1].rstrip("\n"), ""]
    page.write_text("\n".join(lines))
    _plot(results, out.with_suffix(".png"))


def _plot(results: Results, path: Path) -> None:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    worlds = sorted({n for _, _, n in results})
    first = min(results)
    today = [next(e for e in results[(first[0], first[1], n)] if e.replicas == 1) for n in worlds]
    ax.plot(worlds, [e.peak_total_ms for e in today], "o-", label="K = 1 (today)")
    ax2.plot(worlds, [100 * e.share_with_tables for e in today], "o-", label="K = 1")
    for layout, every in sorted({(k[0], k[1]) for k in results}):
        best = [
            pick_replicas(results[(layout, every, n)])
            for n in worlds
            if (layout, every, n) in results
        ]
        ns = [e.world_size for e in best]
        label = f"{layout}, sync every {every}"
        ax.plot(ns, [e.peak_total_ms for e in best], "s-", label=label)
        ax2.plot(ns, [100 * e.share_with_tables for e in best], "s-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="GPUs (864 samples each)", ylabel="peak ms per step")
    ax.set_title("planned embedding cost + replica sync per rank")
    ax.legend(fontsize=7)
    ax2.set(xscale="log", xlabel="GPUs", ylabel="% of ranks holding tables", ylim=(0, 105))
    ax2.legend(fontsize=7)
    FigureCanvasAgg(fig).print_png(str(path))


def intro_lines(every: list[int], layouts: list[str]) -> list[str]:
    return [
        "Each world size N, layout and sync interval S is",
        "",
        "    python -m trainer.plan experiment=mlperf_dcnv2 topology.local_world_size=8 \\",
        "        topology.hbm_gb=80 trainer.batch_size=864 topology.world_size=N \\",
        "        sharding.replicas=auto sharding.replica_layout=LAYOUT "
        "sharding.replica_sync_every=S",
        "",
        f"for layouts {', '.join(layouts)} and S in {', '.join(map(str, every))} (batch 864 per "
        "rank at every N; torchrec's default bandwidths: 600 GB/s inside a host, 12.5 GB/s "
        "per device across hosts). K = 1 is today's planner. The model is in "
        "[sharding/replica_plan.py](../sharding/replica_plan.py); what it assumes is below the "
        "tables.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    parser.add_argument("--every", type=int, nargs="+", default=list(EVERY))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--out", type=Path, default=Path("docs/scaling"))
    args = parser.parse_args()
    quiet_libraries(level=logging.ERROR)
    start = time.monotonic()
    cache: dict[tuple[int, int], GroupPlan] = {}
    results: Results = {}
    for n in args.worlds:
        for layout in args.layouts:
            planned = plan_world(n, layout=layout, every=tuple(args.every), cache=cache)
            for every, es in planned.items():
                results[(layout, every, n)] = es
                best = pick_replicas(es)
                print(
                    f"N={n} {layout} every {every}: chosen K={best.replicas} "
                    f"{best.peak_total_ms:.2f} ms ({time.monotonic() - start:.0f} s)",
                    flush=True,
                )
    write_page(results, args.out, time.monotonic() - start, intro_lines(args.every, args.layouts))
    print(f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
