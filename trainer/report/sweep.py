"""Sweep report: any Hydra multirun directory as a markdown table, a CSV and a Pareto PNG.

One row per job (a directory holding ``.hydra/overrides.yaml``): the overrides
that vary across the sweep, the job's status, and its ``summary.json`` metrics
(dotted keys reach into nested ones: ``export.bytes``). A job without
``summary.json`` is ``failed`` with its error line: the last ERROR of the job's
Hydra log (``<job>/*.log``; the trainer logs the error there in a sweep), else
the last error line of the SLURM launcher's stderr
(``<sweep>/.submitit/<array id>_<job num>/*_log.err``). The other jobs are
still reported. Writes ``report.md``, ``report.csv`` and ``pareto.png`` (eval
AUC against model bytes, exported where the job exported, and against
samples/s; the Pareto front joined) into the sweep directory. An optuna search
(``hydra/sweeper=optuna``) adds its study: trials, best settings and parameter
importances in report.md, the trials in ``trials.csv`` (report/optuna_trials.py).

Example::

    python -m trainer -m +sweep=lr_batch trainer.num_steps=300
    python -m trainer.report multirun/lr_batch/2026-11-29_18-47-04
    make sweep-report DIR=multirun/lr_batch/2026-11-29_18-47-04
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.report import optuna_trials

DEFAULT_METRICS = [
    "auc",
    "logloss",
    "ne",
    "samples_per_sec",
    "embedding_bytes",
    "export.auc",
    "export.bytes",
]
# A line of a launcher's stderr that says what went wrong.
_ERROR_LINE = re.compile(r"(Error|Exception|error:|CANCELLED|Killed|OOM|DUE TO)")
# Hydra's file log format: "[2026-11-29 18:49:55,327][trainer][ERROR] - message".
_LOG_ERROR = re.compile(r"^\[[^]]*\]\[[^]]*\]\[ERROR\] - (.*)$")


@dataclass
class Job:
    """One job of a sweep: where it ran, what it overrode, and how it ended."""

    path: Path
    label: str  # the job's directory relative to the sweep (Hydra: its job number)
    overrides: dict[str, str]
    summary: dict[str, Any] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None

    def metric(self, key: str) -> Any:
        """``summary[key]``, dotted keys reaching into nested dicts; None if absent."""
        value: Any = self.summary
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value


def collect_jobs(sweep_dir: Path) -> list[Job]:
    """Every job under ``sweep_dir``, ordered by job number (then path)."""
    sweep_dir = Path(sweep_dir)
    job_dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    jobs = []
    for job_dir in job_dirs:
        label = job_dir.relative_to(sweep_dir).as_posix()
        overrides = _read_overrides(job_dir / ".hydra" / "overrides.yaml")
        summary_path = job_dir / "summary.json"
        if summary_path.exists():
            jobs.append(Job(job_dir, label, overrides, json.loads(summary_path.read_text())))
        else:
            error = error_line(job_dir, sweep_dir=sweep_dir)
            jobs.append(Job(job_dir, label, overrides, None, error))
    return sorted(
        jobs, key=lambda j: (0, int(j.label), "") if j.label.isdigit() else (1, 0, j.label)
    )


def _read_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value``) as a dict, ``+``/``~`` kept off."""
    overrides = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def error_line(job_dir: Path, *, sweep_dir: Path) -> str:
    """Why a job has no summary: its log's last error, the launcher's stderr, or a hint."""
    for log in sorted(job_dir.glob("*.log")):
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines()]
        errors = [i for i, line in enumerate(lines) if _LOG_ERROR.match(line)]
        if errors:
            first = _LOG_ERROR.match(lines[errors[-1]]).group(1)  # type: ignore[union-attr]
            # log.exception: the message, then the traceback ending in "Type: message".
            tail = [line for line in lines[errors[-1] + 1 :] if line.strip()]
            return tail[-1].strip() if tail else first
    num = job_dir.name
    for err in sorted(sweep_dir.glob(f".submitit/*_{num}/*_log.err")) + sorted(
        sweep_dir.glob(f".submitit/{num}/*_log.err")
    ):
        lines = [line.strip() for line in err.read_text(errors="replace").splitlines()]
        matches = [line for line in lines if _ERROR_LINE.search(line)]
        if matches or any(lines):
            return (matches or [line for line in lines if line])[-1]
    return f"no summary.json and no error in {job_dir.name}/*.log (killed, or still running?)"


def varying_keys(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """The override keys whose value differs between jobs, and the ones all share."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in varying}
    return varying, common


def short_label(job: Job, keys: list[str]) -> str:
    """``embedding_lr=0.02 batch_size=512``: the varying overrides, last name parts."""
    parts = [
        f"{k.split('.')[-1]}={job.overrides[k].split('/')[-1]}" for k in keys if k in job.overrides
    ]
    return " ".join(parts) or f"#{job.label}"


def table_rows(jobs: list[Job], metrics: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: job, varying overrides, status, the metrics any job has, error."""
    varying, _ = varying_keys(jobs)
    present = [m for m in metrics if any(j.metric(m) is not None for j in jobs)]
    header = ["job", *varying, "status", *present, "error"]
    rows = [
        [
            j.label,
            *(j.overrides.get(k, "") for k in varying),
            "ok" if j.ok else "failed",
            *(j.metric(m) for m in present),
            j.error or "",
        ]
        for j in jobs
    ]
    return header, rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (key.endswith("bytes") or key.endswith("per_sec")):
        return f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("bytes"):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(jobs: list[Job], metrics: list[str], *, title: str) -> str:
    """The report as markdown: a title line, the shared overrides, the table."""
    header, rows = table_rows(jobs, metrics)
    if not any(row[-1] for row in rows):  # no failures: no error column
        header, rows = header[:-1], [row[:-1] for row in rows]
    _, common = varying_keys(jobs)
    failed = sum(not j.ok for j in jobs)
    lines = [f"{title}: {len(jobs)} jobs, {failed} failed"]
    if common:
        lines.append("common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()))
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(h, v) for h, v in zip(header, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(jobs: list[Job], metrics: list[str], out: Path) -> Path:
    """Every override (not only the varying ones), status, metrics and error per job."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    _, rows = table_rows(jobs, metrics)
    present = [m for m in metrics if any(j.metric(m) is not None for j in jobs)]
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, "status", *present, "error"])
        for job in jobs:
            writer.writerow(
                [
                    job.label,
                    *(job.overrides.get(k, "") for k in keys),
                    "ok" if job.ok else "failed",
                    *("" if job.metric(m) is None else job.metric(m) for m in present),
                    job.error or "",
                ]
            )
    return out


def pareto_front(points: list[tuple[float, float]], *, more_x_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (more y is better)."""
    sign = 1 if more_x_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(sign * x2 >= sign * x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(jobs: list[Job], out: Path) -> Path | None:
    """AUC against bytes (exported where the job exported) and against samples/s."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ok = [j for j in jobs if j.ok and j.metric("auc") is not None]
    if not ok:
        return None
    varying, _ = varying_keys(ok)  # what tells the plotted jobs apart
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_bytes, ax_speed = fig.subplots(1, 2)
    sweep = "/".join(out.parent.parts[-2:])
    fig.suptitle(f"{sweep}: eval AUC against size and speed ({len(ok)} jobs)")

    # Left: the served model where there is one (its AUC and bytes), else the tables.
    sized = [j for j in ok if (j.metric("export.bytes") or j.metric("embedding_bytes"))]
    points = [
        (
            (j.metric("export.bytes") or j.metric("embedding_bytes")) / 2**20,
            j.metric("export.auc") if j.metric("export.bytes") else j.metric("auc"),
        )
        for j in sized
    ]
    hollow = [j.metric("export.bytes") is None for j in sized]
    _scatter(ax_bytes, sized, points, varying, hollow=hollow, more_x_is_better=False)
    ax_bytes.set(xlabel="model MiB (exported; hollow: training tables)", ylabel="eval AUC")

    fast = [j for j in ok if j.metric("samples_per_sec") is not None]
    points = [(j.metric("samples_per_sec"), j.metric("auc")) for j in fast]
    _scatter(ax_speed, fast, points, varying, hollow=None, more_x_is_better=True)
    ax_speed.set(xlabel="training samples/s", ylabel="eval AUC")
    fig.savefig(out, dpi=110)
    return out


def _scatter(
    ax: Any,
    jobs: list[Job],
    points: list[tuple[float, float]],
    varying: list[str],
    *,
    hollow: list[bool] | None,
    more_x_is_better: bool,
) -> None:
    if not points:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    # Neighbours along x get their labels above and below in turn, so they rarely collide.
    by_x = sorted(range(len(points)), key=lambda i: points[i])
    for order, i in enumerate(by_x):
        (x, y), job = points[i], jobs[i]
        face = "none" if hollow and hollow[i] else "tab:blue"
        ax.scatter([x], [y], s=40, facecolors=face, edgecolors="tab:blue")
        offset = (5, 5) if order % 2 == 0 else (5, -12)
        label = short_label(job, varying)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    front = pareto_front(points, more_x_is_better=more_x_is_better)
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "-o",
        color="tab:orange",
        markerfacecolor="none",
        markersize=11,
        linewidth=1,
        label="Pareto front",
    )
    ax.margins(x=0.3, y=0.15)  # room for the labels
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)


def write_report(
    sweep_dir: Path, *, metrics: list[str] | None = None, out_dir: Path | None = None
) -> tuple[list[Job], str]:
    """Writes report.md, report.csv and pareto.png; returns the jobs and the markdown."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(
            f"no Hydra jobs (*/.hydra/overrides.yaml) under {sweep_dir}; run a sweep first, "
            "e.g. python -m trainer -m +sweep=lr_batch"
        )
    metrics = metrics or DEFAULT_METRICS
    markdown = to_markdown(jobs, metrics, title=f"sweep {sweep_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    study = optuna_trials.find_study(sweep_dir)
    if study is not None:
        markdown += "\n" + optuna_trials.to_markdown(study)
        optuna_trials.write_csv(study, out_dir / "trials.csv")
    (out_dir / "report.md").write_text(markdown)
    write_csv(jobs, metrics, out_dir / "report.csv")
    plot_pareto(jobs, out_dir / "pareto.png")
    return jobs, markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated summary.json keys, dotted for nested (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"{args.sweep_dir}: no such directory (pass a Hydra multirun directory)")
    _, markdown = write_report(args.sweep_dir, metrics=args.metrics.split(","))
    print(markdown)
    print(f"wrote {args.sweep_dir}/report.md, report.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
