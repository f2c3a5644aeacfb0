"""Distillation study: mean ± sd over seeds of the ``+sweep=distill_study`` jobs, and a PNG.

The sweep (conf/sweep/distill_study.yaml) runs four configurations, three seeds
each: the student alone, the student distilled online (fp32, and int4-QAT),
and the teacher alone. This prints, per configuration, the student's (or the
teacher's) eval AUC and log loss, the step time, and for the int4 student its
exported AUC; then whether distillation beat the student alone by more than
the seed spread, the share of the teacher-student gap it closed, the int4-QAT
student's distance from the fp32 one (target: within 0.002 AUC), and the
step-time cost of distilling (the pair against the teacher alone, by the mean
and, less sensitive to a job that shared the cores with something else, by the
median of the per-job step times, with their min-max range).
Writes ``distill_study.md``, ``distill_study.json`` and ``distill_study.png``
into the (first) sweep directory, or ``--out``.

Several sweep directories may be given (e.g. the arms run as separate sweeps);
their jobs are pooled per configuration.

Example::

    python -m trainer -m +sweep=distill_study trainer.num_steps=1000
    python -m benchmarks.studies.distill multirun/distill_study/<date_time> [more dirs] [--out DIR]
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

from trainer.report.sweep import collect_jobs  # noqa: E402

CONFIGS = {
    "student": "student alone",
    "distilled": "student distilled (fp32)",
    "distilled_int4": "student distilled (int4 QAT)",
    "teacher": "teacher alone",
}
# The target for the int4-QAT distilled student against the fp32 one.
INT4_TARGET_AUC = 0.002


def seed_stats(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "sd": sd,
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def summarise(*sweep_dirs: Path) -> dict[str, dict[str, Any]]:
    """Per configuration: AUC, log loss, step time (and exported AUC) over its seeds."""
    per: dict[str, dict[str, list[float]]] = {}
    jobs = [job for sweep_dir in sweep_dirs for job in collect_jobs(sweep_dir)]
    for job in jobs:
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
        where = ", ".join(str(d) for d in sweep_dirs)
        raise SystemExit(f"no distill_study job finished under {where} (no */summary.json)")
    return {
        name: {k: seed_stats(v) for k, v in per[name].items()} for name in CONFIGS if name in per
    }


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
        diff = dist4["auc"]["mean"] - dist["auc"]["mean"]
        out["int4_vs_fp32_auc"] = diff
        out["int4_within_target"] = abs(diff) <= INT4_TARGET_AUC
    if dist and teacher:
        out["step_time_cost"] = dist["step_ms"]["mean"] / teacher["step_ms"]["mean"] - 1
        out["step_time_cost_median"] = dist["step_ms"]["median"] / teacher["step_ms"]["median"] - 1
    if dist4 and teacher:
        out["step_time_cost_int4_median"] = (
            dist4["step_ms"]["median"] / teacher["step_ms"]["median"] - 1
        )
    return out


def _pm(stat: dict[str, Any] | None, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}" if stat else "-"


def _median_range(stat: dict[str, Any], digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def to_markdown(rows: dict[str, dict[str, Any]], verdict: dict[str, Any]) -> str:
    lines = [
        "| configuration | seeds | AUC | log loss | teacher AUC (same run) "
        "| exported AUC | step ms | step ms median [min-max] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {CONFIGS[name]} | {row['auc']['n']} | {_pm(row['auc'])} | "
            f"{_pm(row['logloss'])} | {_pm(row.get('teacher_auc'))} | "
            f"{_pm(row.get('export_auc'))} | {_pm(row['step_ms'], 1)} | "
            f"{_median_range(row['step_ms'])} |"
        )
    lines.append("")
    lines += [
        f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in verdict.items()
    ]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], out: Path) -> Path:
    """AUC (mean ± sd, each seed a dot) and step time (median, each job a dot) per arm."""
    fig = Figure(figsize=(10.5, 4.4))
    ax, ax_t = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = list(rows)
    labels = [CONFIGS[n].replace(" (", "\n(").replace("student ", "student\n") for n in names]
    xs = range(len(names))
    means = [rows[n]["auc"]["mean"] for n in names]
    sds = [rows[n]["auc"]["sd"] for n in names]
    # Points, not bars: the AUC axis does not start at 0.
    ax.errorbar(xs, means, yerr=sds, fmt="s", ms=8, capsize=8, color="tab:blue")
    for x, n in zip(xs, names):
        seeds = rows[n]["auc"]["values"]
        ax.scatter([x + 0.08] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    low = min(min(rows[n]["auc"]["values"]) for n in names)
    high = max(max(rows[n]["auc"]["values"]) for n in names)
    ax.set_ylim(low - (high - low) * 0.5 - 1e-4, high + (high - low) * 0.3 + 1e-4)
    ax.set_ylabel("eval AUC (square: mean ± sd; dots: seeds)")
    ax.set_title("Online distillation: AUC")
    ax.grid(axis="y", alpha=0.3)
    medians = [rows[n]["step_ms"]["median"] for n in names]
    ax_t.bar(xs, medians, color="tab:orange", alpha=0.6)
    for x, n in zip(xs, names):
        jobs = rows[n]["step_ms"]["values"]
        ax_t.scatter([x] * len(jobs), jobs, color="black", s=12, zorder=3)
    ax_t.set_xticks(list(xs), labels, fontsize=8)
    ax_t.set_ylabel("ms per step (bar: median; dots: jobs)")
    ax_t.set_title("Step time (shared CPU: noisy)")
    ax_t.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.distill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweep_dirs", type=Path, nargs="+", metavar="sweep_dir")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the first sweep_dir)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(*args.sweep_dirs)
    verdict = verdicts(rows)
    text = to_markdown(rows, verdict)
    (out / "distill_study.md").write_text(text)
    (out / "distill_study.json").write_text(
        json.dumps({"rows": rows, "verdicts": verdict}, indent=2)
    )
    plot(rows, out / "distill_study.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
