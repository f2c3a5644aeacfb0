"""``python -m benchmarks.serve --quick`` runs end to end on a tiny model.

In-process ``main``: a 2-step ``qat=int8`` run on four 50-row tables, then every
path at every batch size with one thread and one call each. ``torch.compile``
and the AOTInductor package (tens of seconds of C++ compilation each) are
skipped here; their rows must still be in the table, marked ``skipped``.
Checks the table's rows and the JSON, not timings.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.serve import BATCHES, main
from benchmarks.serve_paths import PATHS


def test_quick_bench_has_every_path_and_batch(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--threads", "1", "--rounds", "1"]
    argv += ["--skip", "compiled", "aoti", "--no-profile"]
    report = main(argv)
    md = (tmp_path / "bench_serve.md").read_text()
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| 8 |")]
    seen = {(int(r[2]), r[3].strip()): r for r in rows}
    assert set(seen) == {(b, p) for b in BATCHES for p in PATHS}
    for batch in BATCHES:
        for path in ("compiled", "aoti"):
            assert seen[batch, path][-1].strip() == "skipped"
        for path in ("eager", "program", "torchrec"):
            assert float(seen[batch, path][6].replace(",", "")) > 0  # rows/s
            assert float(seen[batch, path][8]) < 1e-5  # the same scores as the program
    saved = json.loads((tmp_path / "bench_serve.json").read_text())
    assert saved["results"] == report["results"]
    assert len(report["results"]) == len(BATCHES) * 3
    assert "refused" in seen[1, "program"][-1]  # the export's batch range starts at 2
