"""What a day walk reports: ``days.jsonl``, the per-day table, ``days.png``; and
follow mode's ``follow.png`` (:func:`plot_partitions`, from its ``follow.jsonl``).

One record per day, written when the day is evaluated (before training on it)::

    {"day": 3, "step": 1500, "steps": 500, "auc": 0.791, "oracle_auc": 0.803,
     "oracle_gap": 0.012, "knowable_auc": 0.795, "knowable_gap": 0.004,
     "auc_seen_ids": 0.793, "oracle_auc_seen_ids": 0.802, "knowable_auc_seen_ids": 0.797,
     "auc_new_ids": 0.790, ..., "new_id_samples": 0.67,
     "ne": 0.83, "calibration": 1.01, "logloss": 0.31, "ctr": 0.12}

``auc`` (and ``ne``, ``calibration``, ``logloss``) are the model trained on days
``< day`` on day ``day``'s eval set: the next-day figures. ``step`` is the walk's
global step when evaluated, ``steps`` what it then trains on that day (0 once
``trainer.num_steps`` are spent). ``knowable_auc`` is the day's knowable oracle
(the planted model as the days before tell it: trainer/online/knowable.py) and
``knowable_gap`` = ``knowable_auc - auc``; ``*_seen_ids`` / ``*_new_ids`` are
the figures on the eval samples with only ids used before the day / with an id
new that day (``new_id_samples``: their share; no seen ids on day 0).
:func:`mean_gap` is the walk's figure of merit: the mean of ``oracle_gap`` over
days 1 .. N-1 (day 0 meets an untrained model).

Example::

    append_record(run_dir, record)
    records = read_records(run_dir)
    print(format_table(records))
    plot_days(records, run_dir / DAYS_PLOT, title="online/drift")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DAYS_FILE = "days.jsonl"
DAYS_PLOT = "days.png"
# Columns of the table, in order, with their formats.
_COLUMNS = [
    ("day", "{:d}"),
    ("steps", "{:d}"),
    ("auc", "{:.4f}"),
    ("oracle_auc", "{:.4f}"),
    ("oracle_gap", "{:.4f}"),
    ("knowable_auc", "{:.4f}"),
    ("knowable_gap", "{:.4f}"),
    ("auc_seen_ids", "{:.4f}"),
    ("auc_new_ids", "{:.4f}"),
    ("ne", "{:.4f}"),
    ("calibration", "{:.3f}"),
]


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / DAYS_FILE).open("a") as out:
        out.write(json.dumps(record) + "\n")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / DAYS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def restore_records(run_dir: Path, *, last_day: int, write: bool) -> list[dict[str, Any]]:
    """On resume: the records of days ``<= last_day`` (the checkpoint's); with
    ``write`` (rank 0) the later ones, which the walk evaluates again, leave the
    file too (replaced whole: another rank reading it sees one file or the other)."""
    kept = [r for r in read_records(run_dir) if r["day"] <= last_day]
    if write:
        tmp = run_dir / f".{DAYS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(run_dir / DAYS_FILE)
    return kept


def next_days(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of days 1 .. N-1: a model trained before them (all, with one day)."""
    later = [r for r in records if r["day"] >= 1]
    return later or list(records)


def mean_of(records: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in records if key in r]
    return sum(values) / len(values) if values else math.nan


def mean_gap(records: list[dict[str, Any]]) -> float:
    """Mean ``oracle_gap`` over days 1 .. N-1 (see the module docstring)."""
    return mean_of(next_days(records), "oracle_gap")


def format_table(records: list[dict[str, Any]]) -> str:
    """The per-day table, and the means over days 1 .. N-1 below it."""
    names = [name for name, _ in _COLUMNS]
    rows = [names]
    for record in records:
        rows.append([_cell(record.get(name), fmt) for name, fmt in _COLUMNS])
    later = next_days(records)
    if later:
        means = [_cell(mean_of(later, name), fmt) for name, fmt in _COLUMNS[2:]]
        first = later[0]["day"]
        rows.append([f"{first}-{later[-1]['day']}", "mean", *means])
    widths = [max(len(row[i]) for row in rows) for i in range(len(names))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return fmt.format(value)


def plot_days(
    records: list[dict[str, Any]],
    out_path: Path,
    *,
    title: str = "",
    baseline: list[dict[str, Any]] | None = None,
    baseline_label: str = "baseline",
) -> Path:
    """AUC (before training on the day) and oracle AUC per day, one PNG; with
    ``baseline`` (another walk's records, e.g. the frozen one) its AUC beside it."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    days = [r["day"] for r in records]
    ax.plot(days, [r["oracle_auc"] for r in records], "--", color="gray", label="oracle AUC")
    if all("knowable_auc" in r for r in records[1:]) and len(records) > 1:  # day 0: no model
        ax.plot(
            days[1:],
            [r["knowable_auc"] for r in records[1:]],
            ":",
            color="black",
            label="knowable oracle (what the days before tell)",
        )
    ax.plot(
        days,
        [math.nan if r["auc"] is None else r["auc"] for r in records],  # null: a gap
        marker="o",
        color="tab:orange",
        label="AUC of the model trained on the days before",
    )
    if baseline:
        ax.plot(
            [r["day"] for r in baseline],
            [r["auc"] for r in baseline],
            marker="s",
            color="tab:blue",
            label=f"AUC of the {baseline_label} model",
        )
    trained = [r["day"] for r in records if r.get("steps")]
    if trained and len(trained) < len(days):  # a frozen walk: mark where training stopped
        ax.axvline(
            trained[-1] + 0.5,
            color="tab:blue",
            linewidth=0.8,
            label=f"training ends (after day {trained[-1]})",
        )
    ax.set(
        title=f"next-day AUC per day{f' ({title})' if title else ''}",
        xlabel="day",
        ylabel="AUC",
    )
    ax.set_xticks(days)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(out_path, dpi=110)
    return out_path


def plot_partitions(records: list[dict[str, Any]], out_path: Path, *, title: str = "") -> Path:
    """Follow mode's records (trainer/online/follow.py): the AUC before training on each
    partition (the model trained on the ones before), one PNG, partitions named."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    at = list(range(len(records)))
    ax.plot(
        at,
        [math.nan if r["auc"] is None else r["auc"] for r in records],  # null: a gap
        marker="o",
        color="tab:orange",
        label="AUC of the model trained on the partitions before",
    )
    ax.set(
        title=f"next-partition AUC{f' ({title})' if title else ''}",
        xlabel="partition",
        ylabel="AUC",
    )
    ax.set_xticks(at, [r["partition"] for r in records], rotation=30, ha="right")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(out_path, dpi=110)
    return out_path
