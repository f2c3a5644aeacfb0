"""Per-rank memory of a plan as one PNG: used against the cap, HBM and DDR.

One panel per memory tier the topology has (HBM is absent on a CPU plan):
a bar per rank for the bytes the planner placed there, a solid line at the
device's cap and a dashed one at the planner's budget (the cap less the
storage reservation kept for dense parts and activations).

Example::

    plot_rank_memory(rank_estimates(...), run_dir / "memory.png", title="64 x H100")
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sharding.estimate import RankEstimate

_GIB = 1024**3


def plot_rank_memory(ranks: list[RankEstimate], out_path: Path, *, title: str = "") -> Path:
    """Writes the per-rank memory bars to ``out_path``; returns it."""
    tiers = []
    for key, label, color in (("hbm", "HBM", "tab:blue"), ("ddr", "DDR (host)", "tab:green")):
        cap_bytes = getattr(ranks[0], f"{key}_cap_bytes")
        if cap_bytes > 0:
            used = [getattr(r, f"{key}_used_bytes") / _GIB for r in ranks]
            budget = getattr(ranks[0], f"{key}_budget_bytes") / _GIB
            tiers.append((label, used, cap_bytes / _GIB, budget, color))
    # Bare Figure on the Agg canvas (as trainer/report/plots.py): no display, no pyplot state.
    fig = Figure(
        figsize=(max(7.0, min(16.0, 0.12 * len(ranks) + 6)), 3.2 * len(tiers)), layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tiers), 1, squeeze=False)[:, 0]
    fig.suptitle(title or f"estimated memory per rank ({len(ranks)} ranks)")
    xs = [r.rank for r in ranks]
    for ax, (label, used, cap, budget, color) in zip(axes, tiers, strict=True):
        ax.bar(xs, used, width=0.8, color=color, label=f"{label} used")
        ax.axhline(cap, color="black", linewidth=1.2, label=f"cap {cap:.1f} GiB")
        if budget < cap:
            ax.axhline(
                budget, color="gray", linestyle="--", label=f"planner budget {budget:.1f} GiB"
            )
        peak = max(range(len(used)), key=used.__getitem__)
        ax.set(
            title=f"{label}: peak {used[peak]:.2f} GiB on rank {xs[peak]}",
            ylabel=f"{label} GiB",
            xlim=(-0.6, len(ranks) - 0.4),
            ylim=(0, cap * 1.08),
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("rank")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path
