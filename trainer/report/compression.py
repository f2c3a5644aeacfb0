"""Compression report: the precision x QAT sweep's jobs as configurations, table and PNG.

``make compression-report`` runs the sweep (``python -m trainer -m
+sweep=precision_qat``: the ``conf/experiment/compression/*`` jobs, same data,
seed and steps) and then this module. It writes the generic sweep report
(``trainer.report.sweep``: ``report.md``, ``report.csv``, ``pareto.png``,
failed jobs with their error line) and the compression table, where the fp32
run's post-training int8/int4 exports are the PTQ rows (``compression.md``,
``compression.json``, ``auc_vs_bytes.png``).

Example::

    python -m trainer.report.compression outputs/compression-report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from trainer.report.sweep import Job, collect_jobs, to_markdown, write_report  # noqa: E402

# The generic report's columns for this sweep.
METRICS = [
    "auc",
    "logloss",
    "embedding_bytes",
    "export.auc",
    "export.bytes",
    "export.max_abs_logit_diff",
    "samples_per_sec",
]


def _experiment(job: Job) -> str:
    return job.overrides.get("experiment", "").removeprefix("compression/")


def rows_from(jobs: list[Job]) -> list[dict]:
    """One row per configuration: training rows, then each export as its own row."""
    runs = {_experiment(j): j.summary for j in jobs if j.ok and _experiment(j)}
    if not runs:
        raise SystemExit("no compression job finished (no */summary.json); see report.md")
    rows = []

    def add(label: str, s: dict, *, served: dict | None) -> None:
        rows.append(
            {
                "config": label,
                "auc": (served or s)["auc"],
                "logloss": (served or s)["logloss"],
                "embedding_bytes": s["embedding_bytes"],
                "exported_bytes": served["bytes"] if served else None,
                # How many times smaller the tables are than fp32 (exports: as served).
                "table_ratio": (
                    served["fp32_table_bytes"] / served["table_bytes"]
                    if served and "table_bytes" in served
                    else None
                ),
                "samples_per_sec": s["samples_per_sec"],
            }
        )

    if "fp32_ptq8" in runs:
        add("fp32", runs["fp32_ptq8"], served=None)
        rows[-1]["exported_bytes"] = runs["fp32_ptq8"]["export"]["fp32_bytes"]
        rows[-1]["table_ratio"] = 1.0
    if "bf16" in runs:
        add("bf16", runs["bf16"], served=None)
        if "fp32_ptq8" in runs:  # 16-bit tables while training
            rows[-1]["table_ratio"] = (
                runs["fp32_ptq8"]["embedding_bytes"] / runs["bf16"]["embedding_bytes"]
            )
    for label, key in [
        ("int8-PTQ", "fp32_ptq8"),
        ("int8-QAT", "int8_qat"),
        ("int4-PTQ", "fp32_ptq4"),
        ("int4-QAT", "int4_qat"),
        # At dim 16 int2 rows are no smaller than int4 ones: 4 bytes of codes and
        # 4 of fp16 scale and bias are padded to FBGEMM's 16-byte row alignment.
        ("int2-PTQ", "fp32_ptq2"),
        # Each row's range fitted to its rounding error (qat.range=mse).
        ("int2-PTQ-mse", "fp32_ptq2_mse"),
        ("int2-QAT", "int2_qat"),
        # The int2 student of an online distillation from its fp32 twin.
        ("int2-QAT-KD", "int2_qat_distill"),
    ]:
        if key in runs:
            add(label, runs[key], served=runs[key]["export"])
    fp32_auc = rows[0]["auc"] if rows and rows[0]["config"] == "fp32" else None
    for r in rows:
        r["auc_vs_fp32"] = r["auc"] - fp32_auc if fp32_auc is not None else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<12} {'AUC':>8} {'vs fp32':>8} {'log loss':>9} {'emb bytes':>11} "
        f"{'exported':>11} {'tables':>7} {'samples/s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        exported = f"{r['exported_bytes']:>11,}" if r["exported_bytes"] else f"{'-':>11}"
        delta = f"{r['auc_vs_fp32']:>+8.4f}" if r["auc_vs_fp32"] is not None else f"{'-':>8}"
        ratio = f"{r['table_ratio']:>6.2f}x" if r["table_ratio"] else f"{'-':>7}"
        lines.append(
            f"{r['config']:<12} {r['auc']:>8.4f} {delta} {r['logloss']:>9.4f} "
            f"{r['embedding_bytes']:>11,} {exported} {ratio} {r['samples_per_sec']:>10,.0f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for r in rows:
        size = r["exported_bytes"] or r["embedding_bytes"]
        ax.scatter(size / 2**20, r["auc"], s=40)
        ax.annotate(
            r["config"],
            (size / 2**20, r["auc"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=9,
        )
    ax.set_xlabel("model bytes, MiB (exported where quantized)")
    ax.set_ylabel("eval AUC")
    ax.set_title("shardrec: AUC against model size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def to_markdown_table(rows: list[dict]) -> str:
    """The compression table in markdown, as the README shows it."""
    lines = [
        "| config | AUC | vs fp32 | log loss | tables, x smaller | exported bytes | samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        delta = f"{r['auc_vs_fp32']:+.5f}" if r["auc_vs_fp32"] is not None else "-"
        ratio = f"{r['table_ratio']:.2f}" if r["table_ratio"] else "-"
        exported = f"{r['exported_bytes']:,}" if r["exported_bytes"] else "-"
        lines.append(
            f"| {r['config']} | {r['auc']:.5f} | {delta} | {r['logloss']:.4f} | {ratio} "
            f"| {exported} | {r['samples_per_sec']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def padding_note(rows: list[dict]) -> str | None:
    """Says so when int2 tables came out no smaller than int4 ones (FBGEMM's row padding)."""
    by = {r["config"]: r for r in rows}
    int2 = by.get("int2-QAT") or by.get("int2-PTQ")
    int4 = by.get("int4-QAT") or by.get("int4-PTQ")
    if not (int2 and int4 and int2["table_ratio"] and int4["table_ratio"]):
        return None
    if int2["table_ratio"] > int4["table_ratio"] * 1.01:
        return None
    return (
        "int2 tables are no smaller than int4 ones here: FBGEMM pads every quantized row "
        "(codes + 4 bytes of fp16 scale and bias) to 16 bytes, so at dim 16 int2's 4 + 4 "
        "and int4's 8 + 4 bytes both take 16; int2 pays off from dim 64 (dim 128: 48 bytes "
        "against int4's 80)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report.compression", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="the precision_qat sweep's directory")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir
    if not collect_jobs(sweep_dir):
        raise SystemExit(f"no Hydra jobs under {sweep_dir}; run `make compression-report`")
    jobs, _ = write_report(sweep_dir, metrics=METRICS)
    failed = [j for j in jobs if not j.ok]
    if failed:
        print(to_markdown(failed, METRICS, title="failed jobs"))
    rows = rows_from(jobs)
    print(format_table(rows))
    note = padding_note(rows)
    if note:
        print(f"\nnote: {note}")
    (sweep_dir / "compression.md").write_text(
        to_markdown_table(rows) + (f"\n{note}\n" if note else "")
    )
    (sweep_dir / "compression.json").write_text(json.dumps(rows, indent=2))
    print(f"\nplot: {plot(rows, sweep_dir / 'auc_vs_bytes.png')}")
    print(f"per job: {sweep_dir / 'report.md'}, report.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
