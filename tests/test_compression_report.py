"""The compression report reads a sweep's run directories into one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

EXPORT = {
    "auc": 0.70,
    "logloss": 0.40,
    "bytes": 100,
    "fp32_bytes": 400,
    "table_bytes": 80,
    "fp32_table_bytes": 320,
}


def _run(sweep: Path, num: int, experiment: str, summary: dict) -> None:
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- experiment=compression/{experiment}\n")
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_table_and_plot(tmp_path: Path) -> None:
    base = {"auc": 0.75, "logloss": 0.38, "embedding_bytes": 300, "samples_per_sec": 1000.0}
    _run(tmp_path, 0, "fp32_ptq8", {**base, "export": EXPORT})
    _run(tmp_path, 1, "int4_qat", {**base, "auc": 0.74, "export": {**EXPORT, "auc": 0.74}})
    proc = subprocess.run(
        [sys.executable, "scripts/compression_report.py", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["config"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert set(rows) == {"fp32", "int8-PTQ", "int4-QAT"}
    # fp32 reports the trained model and its fp32 size; PTQ/QAT report the served export.
    assert rows["fp32"]["auc"] == 0.75 and rows["fp32"]["exported_bytes"] == 400
    assert rows["int8-PTQ"]["auc"] == 0.70 and rows["int8-PTQ"]["exported_bytes"] == 100
    assert rows["int4-QAT"]["auc"] == 0.74
    assert abs(rows["int4-QAT"]["auc_vs_fp32"] - (0.74 - 0.75)) < 1e-12
    assert rows["int4-QAT"]["table_ratio"] == 4.0 and rows["fp32"]["table_ratio"] == 1.0
    assert "int4-QAT" in proc.stdout and (tmp_path / "auc_vs_bytes.png").stat().st_size > 1000


def test_report_without_runs_says_what_to_do(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/compression_report.py", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "make compression-report" in proc.stderr
