"""Plot an elastic run's loss curve across a world-size change, as one PNG.

Reads ``metrics.jsonl`` of a run directory (train records: ``step``,
``train_loss``; eval records: ``step``, ``auc``) and marks the step the run
resumed from (the newest ``resumed from ... at step N`` of the agents' logs, or
``--resumed-at``).

Example::

    python -m benchmarks.elastic_plot /tmp/grow/test_a_run_grows_when_a_node_j0/run \\
        benchmarks/elastic_grow.png --title "2 ranks -> 4 ranks" --resumed-at 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot(run_dir: Path, out: Path, *, title: str, resumed_at: int | None) -> Path:
    """Writes train loss and eval AUC against step to ``out``; returns it."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    train = sorted((r["step"], r["train_loss"]) for r in records if "train_loss" in r)
    evals = sorted((r["step"], r["auc"]) for r in records if "auc" in r)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_auc = fig.subplots(1, 2)
    fig.suptitle(title)
    if train:
        ax_loss.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1.2)
    ax_loss.set(title="Train loss", xlabel="step", ylabel="train loss (BCE)")
    if evals:
        ax_auc.plot(*zip(*evals, strict=True), "o-", color="tab:green")
    ax_auc.set(title="Eval AUC", xlabel="step", ylabel="AUC")
    if resumed_at is not None:
        for ax in (ax_loss, ax_auc):
            ax.axvline(
                resumed_at, color="tab:red", linestyle="--", label=f"resumed at {resumed_at}"
            )
            ax.legend(loc="best")
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="elastic run")
    parser.add_argument("--resumed-at", type=int, default=None)
    args = parser.parse_args()
    print(plot(args.run_dir, args.out, title=args.title, resumed_at=args.resumed_at))


if __name__ == "__main__":
    main()
