"""Distillation study: mean ± sd over seeds of the ``+sweep=distill_study`` jobs, and a PNG.

The sweep (conf/sweep/distill_study.yaml) runs four configurations, three seeds
each: the student alone, the student distilled online (fp32, and int4-QAT),
and the teacher alone. This prints, per configuration, the student's (or the
teacher's) eval AUC and log loss, the step time, and for the int4 student its
exported AUC; then whether distillation beat the student alone by more than
the seed spread, the share of the teacher-student gap it closed, the int4-QAT
student's distance from the fp32 one, and the step-time cost of distilling.
Writes ``distill_study.md``, ``distill_study.json`` and ``distill_study.png``
into the sweep directory.

Example::

    python -m trainer -m +sweep=distill_study trainer.num_steps=1000
    python scripts/distill_study.py multirun/distill_study/<date_time>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from sweep_report import collect_jobs  # noqa: E402

CONFIGS = {
    "student": "student alone",
    "distilled": "student distilled (fp32)",
    "distilled_int4": "student distilled (int4 QAT)",
    "teacher": "teacher alone",
}


def _stats(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def summarise(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Per configuration: AUC, log loss, step time (and exported AUC) over its seeds."""
    per: dict[str, dict[str, list[float]]] = {}
    for job in collect_jobs(sweep_dir):
        name = job.overrides.get("experiment", "").removeprefix("distill/")
        if name not in CONFIGS or not job.ok or job.summary is None:
            continue
        s = job.summary
        row = per.setdefault(name, {})
        head = "student." if "student.auc" in s else ""
        row.setdefault("auc", []).append(s[f"{head}auc"])
        row.setdefault("logloss", []).append(s[f"{head}logloss"])
        step_s = s.get("step_time_s", s["global_batch_size"] / s["samples_per_sec"])
        row.setdefault("step_ms", []).append(1000 * step_s)
        if "teacher.auc" in s:
            row.setdefault("teacher_auc", []).append(s["teacher.auc"])
        if "export" in s:
            row.setdefault("export_auc", []).append(s["export"]["auc"])
            row.setdefault("export_diff", []).append(s["export"]["max_abs_logit_diff"])
    if not per:
        raise SystemExit(f"no distill_study job finished under {sweep_dir} (no */summary.json)")
    return {name: {k: _stats(v) for k, v in per[name].items()} for name in CONFIGS if name in per}


def verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, measured (None where a configuration is missing)."""
    out: dict[str, Any] = {}
    alone, dist, dist4, teacher = (rows.get(k) for k in CONFIGS)
    if alone and dist:
        gain = dist["auc"]["mean"] - alone["auc"]["mean"]
        spread = max(alone["auc"]["sd"], dist["auc"]["sd"])
        out["distill_gain_auc"] = gain
        out["seed_spread_auc"] = spread
        out["beats_student_alone_beyond_spread"] = gain > spread
        if teacher:
            gap = teacher["auc"]["mean"] - alone["auc"]["mean"]
            out["teacher_student_gap_auc"] = gap
            out["gap_closed"] = gain / gap if gap > 0 else None
    if dist and dist4:
        out["int4_vs_fp32_auc"] = dist4["auc"]["mean"] - dist["auc"]["mean"]
    if dist and teacher:
        out["step_time_cost"] = dist["step_ms"]["mean"] / teacher["step_ms"]["mean"] - 1
    return out


def _pm(stat: dict[str, float] | None, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}" if stat else "-"


def to_markdown(rows: dict[str, dict[str, Any]], verdict: dict[str, Any]) -> str:
    lines = [
        "| configuration | seeds | AUC | log loss | teacher AUC (same run) "
        "| exported AUC | step ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {CONFIGS[name]} | {row['auc']['n']} | {_pm(row['auc'])} | "
            f"{_pm(row['logloss'])} | {_pm(row.get('teacher_auc'))} | "
            f"{_pm(row.get('export_auc'))} | {_pm(row['step_ms'], 1)} |"
        )
    lines.append("")
    lines += [
        f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in verdict.items()
    ]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], out: Path) -> Path:
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    names = list(rows)
    means = [rows[n]["auc"]["mean"] for n in names]
    sds = [rows[n]["auc"]["sd"] for n in names]
    ax.bar(range(len(names)), means, yerr=sds, capsize=6, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), [CONFIGS[n].replace(" (", "\n(") for n in names])
    low = min(m - s for m, s in zip(means, sds))
    high = max(m + s for m, s in zip(means, sds))
    ax.set_ylim(low - (high - low) * 0.5 - 1e-4, high + (high - low) * 0.3 + 1e-4)
    ax.set_ylabel("eval AUC (mean ± sd over seeds)")
    ax.set_title("Online distillation: student alone, distilled, teacher")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    rows = summarise(args.sweep_dir)
    verdict = verdicts(rows)
    text = to_markdown(rows, verdict)
    (args.sweep_dir / "distill_study.md").write_text(text)
    (args.sweep_dir / "distill_study.json").write_text(
        json.dumps({"rows": rows, "verdicts": verdict}, indent=2)
    )
    plot(rows, args.sweep_dir / "distill_study.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
