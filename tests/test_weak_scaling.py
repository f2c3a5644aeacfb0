"""benchmarks/weak_scaling.py writes the table and the plot from the planner's K table.

Synthetic estimates (planning the MLPerf shapes takes minutes): the page lists
K = 1 beside the chosen K for every world size, and the PNG is written.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.weak_scaling import write_page
from sharding.replica_plan import ReplicaEstimate


def _est(k: int, n: int, emb: float, sync: float) -> ReplicaEstimate:
    return ReplicaEstimate(k, n, n // k, 8 // k, emb, sync, emb + sync, n, 2**30, 68 * 2**30)


def test_page_and_plot(tmp_path: Path) -> None:
    results = {
        256: [_est(1, 256, 7.6, 0.0), _est(2, 256, 4.0, 8.0)],
        1024: [_est(1, 1024, 30.3, 0.0), _est(2, 1024, 15.0, 1.0)],
    }
    write_page(results, tmp_path / "scaling", elapsed_s=60)
    page = (tmp_path / "scaling.md").read_text()
    assert "| 1024 | 2 | 512 | 15.00 | 1.00 | 16.00 |" in page
    assert "| 256 | 1 | 256 | 7.60 | 0.00 | 7.60 |" in page
    assert "N = 1024: K = 1 3.99x, chosen K = 2: 2.11x" in page
    assert (tmp_path / "scaling.png").stat().st_size > 1000
