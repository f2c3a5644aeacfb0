"""``make bench``'s plot: one row per shape, bars at the medians, ratios per round."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks.bench_plot import plot_bench


def _shape(name: str, rates: dict[str, list[float]]) -> dict:
    return {
        "shape": name,
        "batch_size": 2048,
        "world_size": 2,
        "device": "cpu",
        "contenders": {n: {"samples_per_sec": r, "rss_added_mb": 1.0} for n, r in rates.items()},
    }


def test_plot_has_a_row_per_shape_and_the_round_by_round_ratios(tmp_path: Path) -> None:
    results = [
        _shape(
            "small",
            {"shardrec": [110.0, 90.0, 100.0], "torchrec": [100.0, 60.0, 100.0]},
        ),
        _shape("no_baseline", {"shardrec": [5.0, 7.0, 6.0], "dense": [20.0, 21.0, 22.0]}),
    ]
    out = tmp_path / "bench" / "bench.png"
    fig = plot_bench(results, out)

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    rate, ratio, rate2, ratio2 = fig.axes
    # Throughput bars at the medians, first contender on top.
    assert sorted(p.get_width() for p in rate.patches) == [100.0, 100.0]
    rows = dict(zip((t.get_text() for t in rate.get_yticklabels()), rate.get_yticks(), strict=True))
    assert rows["shardrec"] > rows["torchrec"]
    # shardrec / torchrec per round: 1.1, 1.5, 1.0 -> median 1.1 (the ratio of the
    # medians would say 1.0): the bar is the median of the rounds' ratios.
    (bar,) = ratio.patches
    assert bar.get_width() == pytest.approx(statistics.median([1.1, 1.5, 1.0]))
    assert "small" in ratio.get_title()
    # Without a torchrec contender the ratio panel is left empty.
    assert sorted(p.get_width() for p in rate2.patches) == [6.0, 21.0]
    assert not ratio2.axison
