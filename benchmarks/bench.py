"""``make bench``: shardrec against plain PyTorch, torchrec's own loop and the dense floor.

For each shape, one torchrun job (``benchmarks.worker``; 2 gloo ranks of
one thread each on CPU) builds every contender in the same processes, warms
them up, and times them in interleaved rounds; see ``benchmarks.models``
for what each contender is. Printed per shape: samples/s (median and min-max
over the rounds), the RSS each contender added, the ratios shardrec/pytorch,
shardrec/torchrec and shardrec/dense (a: shardrec, a': with the prefetcher,
p: on batches drawn up front; f: its CPU tables updated by FBGEMM's backward,
not the compiled one of ``sharding.tbe_cpu``; s: drawing the synthetic slots
in stages, without the compiled loop of ``trainer.data.slot_draw``, only when
asked for with ``--contenders``), and where shardrec's step goes.
``benchmarks.op_profile`` compares shardrec's step with torchrec's op by op. The last
line carries the ratios of every shape. JSON, a Markdown table and a plot
(``bench.png``: ``benchmarks.bench_plot``) land in ``--out``.

Example::

    python -m benchmarks.bench --quick                # a minute or two
    python -m benchmarks.bench                        # the full run, about 10 minutes
    python -m benchmarks.bench --device cuda --world-size 1 --shapes dcnv2 \
        --contenders shardrec,torchrec,dense --batch-size 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_plot import plot_bench

REPO = Path(__file__).resolve().parents[1]
RATIOS = (("pytorch", "a/b"), ("torchrec", "a/c"), ("dense", "a/d"))
# shardrec against itself with one compiled part turned off: that part's gain.
AB_RATIOS = {
    "a/s": ("shardrec", "shardrec_staged"),  # the compiled slot draw
    "a/f": ("shardrec", "shardrec_fbgemm"),  # the compiled table backward
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="shardrec vs PyTorch vs torchrec, side by side",
    )
    p.add_argument("--quick", action="store_true", help="small shape only, few short rounds")
    p.add_argument("--shapes", default=None, help="comma list: small,mlperf_mlp,multihot,dcnv2")
    p.add_argument(
        "--contenders",
        default="shardrec,shardrec_prefetch,shardrec_pregen,shardrec_fbgemm,pytorch,torchrec,dense",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--world-size", type=int, default=None, help="default: 2 on CPU, 1 on CUDA")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds")
    p.add_argument("--breakdown-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per rank; default: the shape's")
    p.add_argument(
        "--pool",
        type=int,
        default=8,
        help="batches drawn up front for the contenders that cycle them (torchrec's loop, "
        "plain PyTorch, the dense floor, shardrec_pregen)",
    )
    p.add_argument("--max-rows", type=int, default=4_000_000, help="dcnv2 shape: rows cap")
    p.add_argument(
        "--shardrec-overrides",
        default="",
        help="Hydra overrides for the shardrec contenders, e.g. 'sharding=table_wise'",
    )
    p.add_argument("--out", default=None, help="default: outputs/bench/<time>")
    p.add_argument("--timeout-s", type=int, default=900, help="per shape")
    args = p.parse_args(argv)
    quick = args.quick
    args.shapes = args.shapes or ("small" if quick else "small,mlperf_mlp,multihot")
    args.world_size = args.world_size or (2 if args.device == "cpu" else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.steps = args.steps or (5 if quick else 15)
    args.repeats = args.repeats or (3 if quick else 5)
    if args.breakdown_steps is None:
        args.breakdown_steps = 5 if quick else 10
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    args.out = Path(args.out or REPO / "outputs" / "bench" / stamp)
    return args


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / f"{shape}.json"
    log = args.out / f"{shape}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.world_size}",
        "-m",
        "benchmarks.worker",
        f"--shape={shape}",
        f"--contenders={args.contenders}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--repeats={args.repeats}",
        f"--breakdown-steps={args.breakdown_steps}",
        f"--pool={args.pool}",
        f"--device={args.device}",
        f"--max-rows={args.max_rows}",
        f"--out={out}",
        f"--shardrec-overrides={args.shardrec_overrides}",
    ]
    if args.batch_size:
        cmd.append(f"--batch-size={args.batch_size}")
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    print(f"bench: {shape} ({args.world_size} ranks, {args.device}) ...", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=args.timeout_s
        )
    if done.returncode != 0 or not out.exists():
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"bench: shape {shape} failed (see {log}):\n" + "\n".join(tail))
    return json.loads(out.read_text())


def summarise(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, c in result["contenders"].items():
        xs = c["samples_per_sec"]
        rows[name] = {
            "median": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
            "rss_added_mb": c["rss_added_mb"],
        }
    return rows


def paired_ratios(result: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """a/c, p/c, a/s and a/f round by round (the contenders of a round run back to back,
    so a slow spell of the machine hits both sides of a ratio alike): median, min, max."""
    runs = {n: c["samples_per_sec"] for n, c in result["contenders"].items()}
    out = {}
    for key, (a, c) in {
        "a/c": ("shardrec", "torchrec"),
        "p/c": ("shardrec_pregen", "torchrec"),
        **AB_RATIOS,
    }.items():
        if a in runs and c in runs:
            per_round = [x / y for x, y in zip(runs[a], runs[c], strict=True)]
            out[key] = (statistics.median(per_round), min(per_round), max(per_round))
    return out


def ratios(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    mine = (
        ("shardrec", "a"),
        ("shardrec_prefetch", "a'"),
        ("shardrec_pregen", "p"),
        ("shardrec_staged", "s"),
        ("shardrec_fbgemm", "f"),
    )
    for a, prefix in mine:
        if a not in rows:
            continue
        for other, label in RATIOS:
            if other in rows:
                key = label.replace("a/", f"{prefix}/")
                out[key] = rows[a]["median"] / rows[other]["median"]
    for key, (a, b) in AB_RATIOS.items():
        if a in rows and b in rows:
            out[key] = rows[a]["median"] / rows[b]["median"]
    return out


def format_shape(result: dict[str, Any]) -> str:
    rows = summarise(result)
    lines = [
        f"\n## {result['shape']}: batch {result['batch_size']} per rank x "
        f"{result['world_size']} ranks ({result['device']}), {result['steps']} steps x "
        f"{result['repeats']} rounds, peak RSS {result['peak_rss_mb']:,.0f} MB per rank",
        "",
        "| contender | samples/s (median) | min - max | RSS added, MB |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median']:,.0f} | {r['min']:,.0f} - {r['max']:,.0f} "
            f"| {r['rss_added_mb']:,.0f} |"
        )
    lines.append("")
    lines.append(
        "ratios: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratios(rows).items())
        + "  (a shardrec, a' shardrec+prefetch, p shardrec on batches drawn up front,"
        " s shardrec drawing its slots in stages, f shardrec with FBGEMM's CPU backward,"
        " b pytorch, c torchrec loop, d dense floor)"
    )
    paired = paired_ratios(result)
    if paired:
        lines.append(
            "ratios round by round (median [min - max]): "
            + ", ".join(f"{k} {m:.2f} [{lo:.2f} - {hi:.2f}]" for k, (m, lo, hi) in paired.items())
        )
    b = result.get("breakdown")
    if b:
        labels = dict(b["labels_ms"])
        # copy_batch_to_gpu wraps next_batch (the input) in TrainPipelineSparseDist.
        if "copy_batch_to_gpu" in labels and "next_batch" in labels:
            labels["copy_batch_to_gpu"] = max(labels["copy_batch_to_gpu"] - labels["next_batch"], 0)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in labels.items() if v >= 0.05)
        lines += [
            "",
            f"shardrec step breakdown (ms per step; {b['step_ms']:.1f} unprofiled, "
            f"{b['profiled_step_ms']:.1f} under the profiler): {parts}; "
            f"of which collectives {b['comm_ms']:.1f}; host syncs {b['host_syncs_per_step']:.1f}"
            f"/step ({b['host_sync_ms']:.2f} ms); one batch drawn alone "
            f"{b['input_alone_ms']:.1f} ms",
        ]
    return "\n".join(lines)


def versions() -> str:
    import importlib.metadata as md

    parts = [f"Python {platform.python_version()}"]
    for dist in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec", "numba"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    if os.environ.get("SHARDREC_FUSED_DRAW") == "0":  # trainer/data/slot_draw.py
        parts.append("synthetic slots drawn in stages (SHARDREC_FUSED_DRAW=0)")
    if os.environ.get("SHARDREC_COMPILED_BACKWARD") == "0":  # sharding/tbe_cpu.py
        parts.append("FBGEMM's CPU table backward (SHARDREC_COMPILED_BACKWARD=0)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_shape(shape, args) for shape in args.shapes.split(",") if shape]
    header = (
        f"# make bench ({datetime.date.today()})\n\n"
        f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
        f"{versions()}\ncommand: python -m benchmarks.bench {' '.join(sys.argv[1:])}\n"
    )
    text = header + "\n".join(format_shape(r) for r in results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_bench(results, args.out / "bench.png")
    last = "; ".join(
        f"{r['shape']}: " + " ".join(f"{k}={v:.2f}" for k, v in ratios(summarise(r)).items())
        for r in results
    )
    print(f"\nresults in {args.out}")
    print(f"ratios {last}")


if __name__ == "__main__":
    main()
