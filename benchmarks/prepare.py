"""Preprocessing speed and memory: ``trainer.prepare`` against torchrec's
``BinaryCriteoUtils.tsv_to_npys`` on the same generated Criteo TSV files.

Generates Criteo-format files (label, 13 integers with empties and small
negatives, 26 8-digit hex ids with empties) of each size, then runs each tool
in its own process and reports rows/s (the conversion alone, not the
interpreter start) and peak RSS: of the process, and for shardrec also of its
largest worker process (``RUSAGE_CHILDREN``).

Example::

    .venv/bin/python -m benchmarks.prepare                    # 200k and 1M rows
    .venv/bin/python -m benchmarks.prepare --rows 200000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def generate(path: Path, num_rows: int, seed: int = 0) -> None:
    """A Criteo-format TSV of ``num_rows`` lines, written with pyarrow (vectorised)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pv

    rng = np.random.default_rng(seed)
    lut = np.frombuffer(b"0123456789abcdef", np.uint8)
    batch = 100_000
    with pv.CSVWriter(
        str(path),
        pa.schema([(f"c{i}", pa.string()) for i in range(40)]),
        write_options=pv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
    ) as writer:
        for start in range(0, num_rows, batch):
            n = min(batch, num_rows - start)
            columns = [pc.cast(pa.array(rng.integers(0, 2, n)), pa.string())]
            for _ in range(13):
                ints = pc.cast(pa.array(rng.integers(-2, 2000, n)), pa.string())
                columns.append(pc.if_else(pa.array(rng.random(n) < 0.2), "", ints))
            for _ in range(26):
                ids = rng.integers(0, 2**32, n, dtype=np.uint64)
                nibbles = (ids[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(15)
                text = pa.array(lut[nibbles.astype(np.intp)].view("S8").ravel().astype(str))
                columns.append(pc.if_else(pa.array(rng.random(n) < 0.04), "", text))
            writer.write_table(pa.table(columns, names=[f"c{i}" for i in range(40)]))


def _cpu_seconds() -> float:
    me, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_child(tool: str, tsv: str, out: str, workers: int) -> None:
    """In the child process: convert ``tsv`` with ``tool``; print seconds, CPU seconds
    (this process and its workers) and peak RSS."""
    if tool == "shardrec":
        from trainer.data.data_configs import CriteoDataConfig
        from trainer.prepare import prepare

        cfg = CriteoDataConfig(raw=[tsv], dir=out, num_workers=workers, eval_fraction=0.0)
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        prepare(cfg, progress=False)
    else:
        from torchrec.datasets.criteo import BinaryCriteoUtils

        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        BinaryCriteoUtils.tsv_to_npys(
            tsv, f"{out}_dense.npy", f"{out}_sparse.npy", f"{out}_labels.npy"
        )
    seconds = time.perf_counter() - start
    me, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    report = {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu_before}
    report |= {"rss_mib": me.ru_maxrss / 1024, "worker_mib": kids.ru_maxrss / 1024}
    print(json.dumps(report))


def measure(tool: str, tsv: Path, out: Path, workers: int) -> dict:
    child = [
        sys.executable,
        "-m",
        "benchmarks.prepare",
        "--child",
        tool,
        str(tsv),
        str(out),
        "--workers",
        str(workers),
    ]
    done = subprocess.run(child, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=0, help="shardrec processes (0: all cores)")
    parser.add_argument("--tools", nargs="+", default=["shardrec", "torchrec"])
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "TSV", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child, workers=args.workers)
        return
    print(
        "| rows | tool | seconds | rows/s | CPU seconds | rows per CPU second "
        "| peak RSS (MiB) | largest worker RSS (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for num_rows in args.rows:
            tsv = Path(tmp) / f"criteo_{num_rows}.tsv"
            generate(tsv, num_rows)
            for tool in args.tools:
                r = measure(tool, tsv, Path(tmp) / f"out_{tool}_{num_rows}", args.workers)
                worker = f"{r['worker_mib']:,.0f}" if tool == "shardrec" else "-"
                print(
                    f"| {num_rows:,} | {tool} | {r['seconds']:.2f} | "
                    f"{num_rows / r['seconds']:,.0f} | {r['cpu_seconds']:.2f} | "
                    f"{num_rows / r['cpu_seconds']:,.0f} | {r['rss_mib']:,.0f} | {worker} |",
                    flush=True,
                )
            tsv.unlink()


if __name__ == "__main__":
    main()
