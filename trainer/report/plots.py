"""Training curves from ``metrics.jsonl`` records, as one PNG.

Rendered with matplotlib's Agg backend. Left panel: train loss vs step; right
panel: eval AUC vs step, with the AUC of the planted (oracle) model as a dashed
ceiling when it is known. Records may be train records (``step``,
``train_loss``), eval records (``step``, ``auc``), both in one, or neither
(skipped).

Example::

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    plot_curves(records, run_dir / "curves.png", oracle_auc=0.81)
"""

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_curves(records: list[dict], out_path: Path, *, oracle_auc: float | None = None) -> Path:
    """Writes the train-loss and eval-AUC curves to ``out_path``; returns it."""
    train = sorted((r["step"], r["train_loss"]) for r in records if "train_loss" in r)
    evals = sorted((r["step"], r["auc"]) for r in records if "auc" in r)

    # A bare Figure on the Agg canvas, not pyplot: works without a display
    # (cluster nodes), leaves the user's global backend alone, and is freed
    # with the object instead of piling up in pyplot's registry during a sweep.
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_auc = fig.subplots(1, 2)
    fig.suptitle("shardrec training curves")

    if train:
        steps, losses = zip(*train, strict=True)
        ax_loss.plot(steps, losses, color="tab:blue", linewidth=1.2)
    else:
        _mark_empty(ax_loss, "no train records")
    ax_loss.set(title="Train loss", xlabel="step", ylabel="train loss (BCE)")

    if evals:
        steps, aucs = zip(*evals, strict=True)
        ax_auc.plot(steps, aucs, color="tab:orange", marker="o", markersize=4, label="eval AUC")
        # A distillation run's other head (the plain "auc" is the student's).
        teacher = sorted((r["step"], r["teacher.auc"]) for r in records if "teacher.auc" in r)
        if teacher:
            steps, aucs = zip(*teacher, strict=True)
            ax_auc.plot(steps, aucs, color="tab:green", marker="s", markersize=4, label="teacher")
    else:
        _mark_empty(ax_auc, "no eval records")
    if oracle_auc is not None:
        ax_auc.axhline(
            oracle_auc, color="gray", linestyle="--", label=f"oracle AUC {oracle_auc:.3f}"
        )
    ax_auc.set(title="Eval AUC", xlabel="step", ylabel="AUC")
    if evals or oracle_auc is not None:
        ax_auc.legend(loc="lower right")

    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path


def _mark_empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
