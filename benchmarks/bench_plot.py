"""``make bench``'s results as one PNG: throughput, and each contender against the torchrec loop.

One row per shape. Left: samples/s per contender, the median as a bar and each
timed round as a dot (the spread is the machine's noise). Right: each
contender's samples/s divided by the torchrec loop's in the same round (the
contenders of a round run back to back, so a slow spell of the machine hits
both alike), the median as a bar, the rounds as dots, 1.0 dashed; absent
without a ``torchrec`` contender.

Example::

    results = [json.loads(Path(d, "small.json").read_text())]
    plot_bench(results, Path(d, "bench.png"))
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

BASELINE = "torchrec"


def plot_bench(results: list[dict[str, Any]], out_path: Path) -> Figure:
    """Writes the figure of ``results`` (one worker JSON per shape) to ``out_path``."""
    fig = Figure(figsize=(12, 1.2 + 2.6 * len(results)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 2, squeeze=False)
    fig.suptitle("make bench: samples/s per contender, and against the torchrec loop")
    for (ax_rate, ax_ratio), result in zip(axes, results, strict=True):
        contenders = result["contenders"]
        names = list(contenders)
        rates = [contenders[n]["samples_per_sec"] for n in names]
        _bars(ax_rate, names, rates)
        ax_rate.set(
            title=f"{result['shape']}: batch {result['batch_size']} x {result['world_size']} "
            f"ranks ({result['device']})",
            xlabel="samples/s",
        )
        ax_rate.xaxis.set_major_formatter(EngFormatter(sep=""))  # 100k, not 100000
        base = contenders.get(BASELINE, {}).get("samples_per_sec")
        if base is None:
            ax_ratio.set_axis_off()
            continue
        others = [n for n in names if n != BASELINE]
        ratios = [
            [x / y for x, y in zip(contenders[n]["samples_per_sec"], base, strict=True)]
            for n in others
        ]
        _bars(ax_ratio, others, ratios)
        ax_ratio.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax_ratio.set(title=f"{result['shape']}: / {BASELINE} loop, round by round", xlabel="ratio")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return fig


def _bars(ax: Any, names: list[str], values: list[list[float]]) -> None:
    """Median bars with every round as a dot, one row per name (the first on top)."""
    rows = range(len(names))[::-1]
    ax.barh(list(rows), [statistics.median(v) for v in values], color="tab:blue", alpha=0.35)
    for row, v in zip(rows, values, strict=True):
        ax.plot(v, [row] * len(v), "o", color="tab:blue", markersize=3.5)
        median = statistics.median(v)
        ax.annotate(
            f"{median / 1000:,.1f}k" if median >= 1000 else f"{median:.2f}",
            (median, row),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_yticks(list(rows), names)
    ax.grid(axis="x", alpha=0.3)
