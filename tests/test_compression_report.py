"""The compression report reads the precision x QAT sweep's job directories into one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.processes import run

EXPORT = {
    "auc": 0.70,
    "logloss": 0.40,
    "bytes": 100,
    "fp32_bytes": 400,
    "table_bytes": 80,
    "fp32_table_bytes": 320,
}


def _job(sweep: Path, num: int, experiment: str, summary: dict | None, log: str = "") -> None:
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=compression/{experiment}\n- +sweep=precision_qat\n"
    )
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "__main__.log").write_text(log)


def _report(sweep: Path) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "trainer.report.compression", str(sweep)],
        cwd=REPO,
        timeout=120,
    )


def test_report_table_and_plot(tmp_path: Path) -> None:
    base = {"auc": 0.75, "logloss": 0.38, "embedding_bytes": 300, "samples_per_sec": 1000.0}
    _job(tmp_path, 0, "fp32_ptq8", {**base, "export": EXPORT})
    _job(tmp_path, 1, "int4_qat", {**base, "auc": 0.74, "export": {**EXPORT, "auc": 0.74}})
    _job(
        tmp_path,
        2,
        "bf16",
        None,
        "[2026-11-29 18:49:55,327][trainer][ERROR] - config error: precision=bf16 is broken\n",
    )
    proc = _report(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["config"]: r for r in json.loads((tmp_path / "compression.json").read_text())}
    assert set(rows) == {"fp32", "int8-PTQ", "int4-QAT"}
    # fp32 reports the trained model and its fp32 size; PTQ/QAT report the served export.
    assert rows["fp32"]["auc"] == 0.75 and rows["fp32"]["exported_bytes"] == 400
    assert rows["int8-PTQ"]["auc"] == 0.70 and rows["int8-PTQ"]["exported_bytes"] == 100
    assert rows["int4-QAT"]["auc"] == 0.74
    assert abs(rows["int4-QAT"]["auc_vs_fp32"] - (0.74 - 0.75)) < 1e-12
    assert rows["int4-QAT"]["table_ratio"] == 4.0 and rows["fp32"]["table_ratio"] == 1.0
    assert "int4-QAT" in proc.stdout and (tmp_path / "auc_vs_bytes.png").stat().st_size > 1000
    assert "| int4-QAT | 0.74000 | -0.01000 |" in (tmp_path / "compression.md").read_text()
    # The generic sweep report beside it: every job, the failed one with its error line.
    report = (tmp_path / "report.md").read_text()
    assert "3 jobs, 1 failed" in report
    assert "| 2 | compression/bf16 | failed |" in report
    assert "config error: precision=bf16 is broken" in report and "failed jobs" in proc.stdout
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_report_without_runs_says_what_to_do(tmp_path: Path) -> None:
    proc = _report(tmp_path)
    assert proc.returncode != 0 and "make compression-report" in proc.stderr


def test_report_when_every_job_failed_points_at_the_errors(tmp_path: Path) -> None:
    _job(tmp_path, 0, "fp32_ptq8", None)
    proc = _report(tmp_path)
    assert proc.returncode != 0 and "report.md" in proc.stderr
    assert "failed" in (tmp_path / "report.md").read_text()
