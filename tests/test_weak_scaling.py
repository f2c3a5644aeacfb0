"""benchmarks/weak_scaling.py writes the tables and the plot from the planner's K tables.

Synthetic estimates (planning the MLPerf shapes takes minutes): the page lists
K = 1 beside the chosen K for every world size and setting, says whether the
target is met, and the PNG is written.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.weak_scaling import NOTES, intro_lines, write_page
from sharding.replica_plan import ReplicaEstimate


def _est(k: int, n: int, emb: float, sync: float, share: float = 1.0) -> ReplicaEstimate:
    return ReplicaEstimate(
        k, n, n // k, 8, emb, sync, emb + sync, int(share * n), 2**30, 68 * 2**30,
        layout="hosts", sync_every=10, sync_once_ms=10 * sync,
    )  # fmt: skip


def test_page_and_plot(tmp_path: Path) -> None:
    results = {
        ("hosts", 10, 256): [_est(1, 256, 7.6, 0.0, 0.81), _est(2, 256, 4.0, 1.0)],
        ("hosts", 10, 1024): [_est(1, 1024, 30.3, 0.0, 0.2), _est(8, 1024, 4.0, 2.0)],
    }
    write_page(results, tmp_path / "scaling", elapsed_s=60, intro=intro_lines([10], ["hosts"]))
    page = (tmp_path / "scaling.md").read_text()
    assert "| 1024 | hosts | 10 | 8 | 128 | 4.00 | 2.00 | 20.0 | 6.00 | 0.79x |" in page
    assert "| 256 | (K = 1) | 10 | 1 | 256 | 7.60 | 0.00 | 0.0 | 7.60 | 1.00x |" in page
    # 6.00 / 5.00 = 1.2x <= 1.25x and 100% of ranks hold tables.
    assert "N = 1024: 1.20x, 100% of ranks -> target met" in page
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    (tmp_path / "scaling.md").write_text(page + f"{NOTES}\n## What is assumed\n")
    write_page(results, tmp_path / "scaling", elapsed_s=60, intro=intro_lines([10], ["hosts"]))
    assert (tmp_path / "scaling.md").read_text().endswith(f"{NOTES}\n## What is assumed\n")
