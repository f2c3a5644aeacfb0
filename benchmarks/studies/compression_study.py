"""Compression study (issue 22): served AUC against served table bytes, every method.

Each *arm* is the default job at embedding dim 64
(``experiment=compression/dim64_fp32``) with one set of overrides: precision,
QAT bits, row pruning, low-rank / quotient-remainder / mixed-dim tables, online
distillation, and the budget chooser at three budgets (``CHOOSER`` arms). One
run gives one point (its exported bundle's AUC and bytes); the fp32 arm gives
two: its fp32 eval (fp32 tables) and its int8 post-training export. The
fp16-tables arm's own point is its training storage (the bundle has no 16-bit
row format; its export is int8 PTQ, its second point).

The x axis is the served *table-side* bytes: the export's ``bytes`` less its
fp32 dense layers (``fp32_bytes - fp32_table_bytes``), i.e. FBGEMM's packed rows
with scale, bias and 16-byte row alignment, the factorized tables' fp32
projections, and a pruned model's id remap (about 8 bytes per id), as a share
of the unfactorized fp32 tables (rows x dim x 4 of the job's data), the quantity
``budget.ratio`` sets. The whole served model (``export.bytes``) is in the table
too.

``run`` trains the arms one job at a time (``nice -n 10``) into
``OUT/<arm>/s<seed>/`` (an existing ``summary.json`` is skipped, so a run can be
resumed or extended by seeds); ``report`` writes ``compression_study.md``,
``.json`` and ``.png`` (the Pareto front joined, the chooser's points starred)
and checks the issue's targets: at 1/20 and 1/50 of the fp32 table bytes the
best hand-picked arm within 0.003 / 0.006 AUC of fp32; each chooser point
within 0.001 of the best hand-picked arm at no more bytes.

Example::

    python -m benchmarks.studies.compression_study run --out outputs/compression_study --seeds 0
    python -m benchmarks.studies.compression_study run --out outputs/compression_study \
        --seeds 1 2 --arms fp32 qr_int8 qr_int4 budget_20x budget_50x
    python -m benchmarks.studies.compression_study report outputs/compression_study
    python -m benchmarks.studies.compression_study run --data movielens \
        --movielens /tmp/ml-100k --out outputs/compression_study_ml --seeds 0 1 2

``--data movielens``: the same model on MovieLens-100k, with its own QR arms
(benchmarks/studies/compression_study_data.py). ``report --prior OLD.json`` adds
an earlier report's seeds to the directory's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.studies.compression_study_data import (
    DEFAULT_STEPS,
    MOVIELENS_ARMS,
    MOVIELENS_SHARED,
    movielens_overrides,
    table_rows,
)
from benchmarks.studies.distill import seed_stats
from trainer.report.sweep import Job, collect_jobs, pareto_front

BASE = [
    "experiment=compression/dim64_fp32",
    "trainer.progress_bar=false",
    "trainer.plot=false",
]
# arm -> (what it is, overrides on top of BASE).
ARMS: dict[str, tuple[str, list[str]]] = {
    "fp32": ("fp32 tables (export: int8 PTQ)", []),
    "fp16_tables": ("fp16 tables, fp32 dense (export: int8 PTQ)", ["precision.tables=fp16"]),
    "int4": ("int4 QAT", ["qat=int4"]),
    "int2": ("int2 QAT", ["qat=int2"]),
    "int2_prune": (
        "int2 QAT, rows seen < 3 times pruned",
        ["qat=int2", "prune.rows_by=access", "prune.min_access=3"],
    ),
    "rank8_int4": ("low rank 8, int4 QAT", ["model.table_rank=8", "qat=int4"]),
    "mixed05_int8": ("mixed dims alpha 0.5, int8 QAT", ["model.mixed_dims=0.5", "qat=int8"]),
    "qr_int8": ("QR mul (>= 10k rows), int8 QAT", ["model.qr_min_rows=10000", "qat=int8"]),
    "qr_int4": ("QR mul (>= 10k rows), int4 QAT", ["model.qr_min_rows=10000", "qat=int4"]),
    "qr5k_int4": ("QR mul (>= 5k rows), int4 QAT", ["model.qr_min_rows=5000", "qat=int4"]),
    "qr1k_int2": ("QR mul (>= 1k rows), int2 QAT", ["model.qr_min_rows=1000", "qat=int2"]),
    "distill_int8": (
        "distilled dim-4 student, int8 QAT",
        [
            "distill=online",
            "distill.student_qat_bits=8",
            "distill.alpha=0.2",
            "distill.warmup_steps=200",
        ],
    ),
    "budget_10x": ("chooser, budget 1/10", ["budget.ratio=0.1"]),
    "budget_20x": ("chooser, budget 1/20", ["budget.ratio=0.05"]),
    "budget_50x": ("chooser, budget 1/50", ["budget.ratio=0.02"]),
}
SYNTHETIC_ARMS = list(ARMS)
ARMS.update(MOVIELENS_ARMS)
DATA_ARMS = {"synthetic": SYNTHETIC_ARMS, "movielens": [*MOVIELENS_SHARED, *MOVIELENS_ARMS]}
CHOOSER = {"budget_10x": 0.1, "budget_20x": 0.05, "budget_50x": 0.02}
# (budget as a share of fp32 table bytes, AUC the best configuration may lose vs fp32).
TARGETS = ((1 / 20, 0.003), (1 / 50, 0.006))
CHOOSER_TOLERANCE = 0.001


def job_command(
    arm: str, seed: int, steps: int, run_dir: Path, data: list[str] | None = None
) -> list[str]:
    """The ``python -m trainer`` command line of one arm and seed (``data``: its data overrides)."""
    return [
        sys.executable,
        "-m",
        "trainer",
        *BASE,
        *(data or []),
        f"trainer.num_steps={steps}",
        f"trainer.eval_every_steps={steps}",
        f"trainer.seed={seed}",
        *ARMS[arm][1],
        f"hydra.run.dir={run_dir}",
    ]


def run(
    out: Path, arms: list[str], seeds: list[int], steps: int, data: list[str] | None = None
) -> int:
    """Train each (arm, seed) without a summary yet, one at a time; returns failures."""
    failed = 0
    for seed in seeds:
        for arm in arms:
            run_dir = out / arm / f"s{seed}"
            if (run_dir / "summary.json").exists():
                continue
            cmd = ["nice", "-n", "10", *job_command(arm, seed, steps, run_dir, data)]
            print(" ".join(cmd[3:]), flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "stdout.log", "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
            failed += rc != 0
            print(f"  {arm} seed {seed}: exit {rc}", flush=True)
    return failed


def fp32_table_bytes(job: Job) -> int:
    """rows x dim x 4 of the job's unfactorized tables (its resolved Hydra config)."""
    cfg = yaml.safe_load((job.path / ".hydra" / "config.yaml").read_text())
    return sum(table_rows(cfg["data"])) * int(cfg["model"]["embedding_dim"]) * 4


def points_of(job: Job) -> list[dict[str, Any]]:
    """The (point, AUC, bytes) this finished job contributes."""
    summary, s = job.summary or {}, job.label.split("/")[0]
    ref, export = fp32_table_bytes(job), summary.get("export", {})
    out = []
    if s in ("fp32", "fp16_tables"):  # the trained tables themselves (not a bundle format)
        dense = export["fp32_bytes"] - export["fp32_table_bytes"]
        storage = export["fp32_table_bytes"] if s == "fp32" else summary["embedding_bytes"]
        name = "fp32" if s == "fp32" else "fp16_tables"
        label = "fp32 tables" if s == "fp32" else "fp16 tables (training storage)"
        out.append(_point(name, label, summary["auc"], storage, storage + dense, ref))
    if export:
        name = {"fp32": "ptq_int8", "fp16_tables": "fp16_ptq_int8"}.get(s, s)
        label = {"fp32": "int8 PTQ of fp32", "fp16_tables": "int8 PTQ of fp16 tables"}.get(
            s, ARMS.get(s, (s,))[0]
        )
        tables = export["bytes"] - (export["fp32_bytes"] - export["fp32_table_bytes"])
        out.append(_point(name, label, export["auc"], tables, export["bytes"], ref, s))
    return out


def _point(
    name: str, label: str, auc: float, tables: int, served: int, ref: int, arm: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "auc": auc,
        "table_bytes": tables,
        "served_bytes": served,
        "ratio": tables / ref,
        "chooser": arm in CHOOSER,
    }


def prior_points(prior: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """An earlier report's rows (its ``.json``) as points: one per seed value, at its mean bytes."""
    per: dict[str, list[dict[str, Any]]] = {}
    for name, r in prior["rows"].items():
        keep = {k: r[k] for k in ("label", "chooser", "table_bytes", "served_bytes", "ratio")}
        per[name] = [{"name": name, **keep, "auc": v} for v in r["auc"]["values"]]
    return per


def summarise(study_dir: Path, prior: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per point: AUC mean ± sd over seeds, bytes; the Pareto front; the targets.

    ``prior``: an earlier report's ``.json`` whose seeds are added to this directory's
    (for runs whose directories were not kept; a seed in both counts twice).
    """
    per = prior_points(prior) if prior else {}
    failed = []
    for job in collect_jobs(study_dir):
        if not job.ok:
            failed.append({"job": job.label, "error": job.error})
            continue
        for p in points_of(job):
            per.setdefault(p["name"], []).append(p)
    if "fp32" not in per:
        raise SystemExit(f"no finished fp32 job under {study_dir} (fp32/s*/summary.json)")
    rows = {}
    for name, ps in per.items():
        rows[name] = {
            "label": ps[0]["label"],
            "chooser": ps[0]["chooser"],
            "auc": seed_stats([p["auc"] for p in ps]),
            "table_bytes": round(sum(p["table_bytes"] for p in ps) / len(ps)),
            "served_bytes": round(sum(p["served_bytes"] for p in ps) / len(ps)),
            "ratio": sum(p["ratio"] for p in ps) / len(ps),
        }
    names = list(rows)
    front = pareto_front(
        [(rows[n]["ratio"], rows[n]["auc"]["mean"]) for n in names], more_x_is_better=False
    )
    for i, n in enumerate(names):
        rows[n]["pareto"] = i in front
    return {"rows": rows, "targets": targets(rows), "failed": failed}


def best_hand_picked(rows: dict[str, dict[str, Any]], max_ratio: float) -> str | None:
    """The hand-picked (not chooser) point of highest mean AUC at no more than ``max_ratio``."""
    fits = [n for n, r in rows.items() if not r["chooser"] and r["ratio"] <= max_ratio + 1e-12]
    return max(fits, key=lambda n: rows[n]["auc"]["mean"], default=None)


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets against these rows (mean AUC over each point's seeds)."""
    fp32 = rows["fp32"]["auc"]["mean"]
    budgets = []
    for budget, allowed in TARGETS:
        best = best_hand_picked(rows, budget)
        gap = None if best is None else fp32 - rows[best]["auc"]["mean"]
        budgets.append(
            {
                "budget": budget,
                "allowed": allowed,
                "best": best,
                "gap": gap,
                "met": None if gap is None else gap <= allowed,
            }
        )
    chooser = []
    for arm, budget in CHOOSER.items():
        if arm not in rows:
            continue
        row = rows[arm]
        best = best_hand_picked(rows, row["ratio"])
        gap = None if best is None else rows[best]["auc"]["mean"] - row["auc"]["mean"]
        chooser.append(
            {
                "arm": arm,
                "budget": budget,
                "ratio": row["ratio"],
                "fits": row["ratio"] <= budget + 1e-12,
                "best": best,
                "gap": gap,
                "met": None if gap is None else gap <= CHOOSER_TOLERANCE,
            }
        )
    return {"fp32_auc": fp32, "budgets": budgets, "chooser": chooser}


def _frac(x: float) -> str:
    return f"1/{1 / x:.0f}" if x < 1 else "1"


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    order = sorted(rows, key=lambda n: -rows[n]["ratio"])
    lines = [
        "| config | served bytes | table bytes | tables vs fp32 | AUC (mean ± sd) | seeds "
        "| front |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in order:
        r, a = rows[n], rows[n]["auc"]
        star = " (chooser)" if r["chooser"] else ""
        lines.append(
            f"| {r['label']}{star} | {r['served_bytes']:,} | {r['table_bytes']:,} | "
            f"{r['ratio']:.4f} ({_frac(r['ratio'])}) | {a['mean']:.4f} ± {a['sd']:.4f} | "
            f"{a['n']} | {'yes' if r['pareto'] else ''} |"
        )
    t = result["targets"]
    lines += ["", f"fp32 AUC {t['fp32_auc']:.4f}."]
    for b in t["budgets"]:
        if b["best"] is None:
            lines.append(f"- at {_frac(b['budget'])}: no hand-picked config fits")
            continue
        lines.append(
            f"- at {_frac(b['budget'])}: best hand-picked is {rows[b['best']]['label']}, "
            f"fp32 minus it {b['gap']:+.4f} AUC (target <= {b['allowed']}): "
            f"{'met' if b['met'] else 'missed'}"
        )
    for c in t["chooser"]:
        versus = rows[c["best"]]["label"] if c["best"] else "nothing at those bytes"
        gap = "-" if c["gap"] is None else f"{c['gap']:+.4f}"
        lines.append(
            f"- chooser at {_frac(c['budget'])}: tables {c['ratio']:.4f} "
            f"({'within' if c['fits'] else 'OVER'} budget); best hand-picked at no more "
            f"bytes: {versus}; it minus the chooser {gap} AUC (target <= {CHOOSER_TOLERANCE}): "
            f"{'-' if c['met'] is None else 'met' if c['met'] else 'missed'}"
        )
    for f in result["failed"]:
        lines.append(f"- failed: {f['job']}: {f['error']}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path, *, title: str = "") -> Path:
    """AUC (mean ± sd) against table bytes / fp32, log x; front joined, chooser starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = result["rows"]
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for r in rows.values():
        a = r["auc"]
        ax.errorbar(
            r["ratio"],
            a["mean"],
            yerr=a["sd"],
            fmt="*" if r["chooser"] else "o",
            ms=13 if r["chooser"] else 6,
            color="tab:red" if r["chooser"] else ("tab:blue" if r["pareto"] else "tab:gray"),
            capsize=3,
        )
        offset = (4, -10) if r["chooser"] else (4, 3)  # chooser labels below the star
        ax.annotate(r["label"], (r["ratio"], a["mean"]), fontsize=6, xytext=offset,
                    textcoords="offset points")  # fmt: skip
    front = sorted((r["ratio"], r["auc"]["mean"]) for r in rows.values() if r["pareto"])
    ax.plot([x for x, _ in front], [y for _, y in front], "-", color="tab:blue", alpha=0.5)
    for budget, _ in TARGETS:
        ax.axvline(budget, ls=":", color="black", alpha=0.5)
        ax.text(budget, ax.get_ylim()[0], f" {_frac(budget)}", fontsize=7, va="bottom")
    ax.axhline(result["targets"]["fp32_auc"], ls="--", color="black", alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("served table bytes / fp32 table bytes (log)")
    ax.set_ylabel("served AUC")
    ax.set_title(title or "compression study: Pareto front joined, chooser starred", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.compression_study", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the arms one job at a time")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--data", choices=list(DATA_ARMS), default="synthetic")
    r.add_argument("--movielens", type=Path, help="--data movielens: ml-100k.inter/.user/.item")
    r.add_argument("--work", type=Path, help="--data movielens: prepared here (default OUT/data)")
    r.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: the data's arms")
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--steps", type=int, help="default: 500 (synthetic), 351 (movielens)")
    p = sub.add_parser("report", help="table, targets and Pareto PNG of a study directory")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: the study directory")
    p.add_argument("--title", default="")
    p.add_argument("--prior", type=Path, help="an earlier report's .json: its seeds are added")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        data = []
        if args.data == "movielens":
            if args.movielens is None:
                parser.error("--data movielens needs --movielens DIR (RecBole's ml-100k files)")
            data = movielens_overrides(args.work or args.out / "data", args.movielens)
        arms, steps = args.arms or DATA_ARMS[args.data], args.steps or DEFAULT_STEPS[args.data]
        return 1 if run(args.out, arms, args.seeds, steps, data) else 0
    out = args.out or args.study_dir
    out.mkdir(parents=True, exist_ok=True)
    prior = json.loads(args.prior.read_text()) if args.prior else None
    result = summarise(args.study_dir, prior)
    text = to_markdown(result)
    (out / "compression_study.md").write_text(text)
    (out / "compression_study.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, out / "compression_study.png", title=args.title)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
