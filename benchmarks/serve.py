"""``make bench-serve``: latency and rows/s of the served model, path by path, on CPU.

Trains a small QAT model per bit width (``qat=int8``, ``qat=int4``; in-process,
``trainer.export=true`` and a final checkpoint) or takes ``--run DIR`` (a run
with ``bundle/`` and ``checkpoints/``), then times the serving paths of
``benchmarks/serve_paths.py`` (today's eager quantized module, the bundle's
program, the program compiled, its AOTInductor package, torchrec's reference
FX + TorchScript path) on the same rows at batch 1, 64, 512 and 4096, with one
thread and with every core. Rounds are interleaved (each round calls every
path at every batch size in turn), so load on the machine hits all paths
alike. Per (bits, threads, batch, path): p50/p99 latency over all calls,
rows/s (batch / mean latency) and the largest probability difference from the
program. Also profiles the eager module with one thread at batch 512 and 4096
(``torch.profiler``: each op's self time per row, and minor page faults per
call), the data behind its superlinear cost at large batches.

Writes ``bench_serve.json`` and ``bench_serve.md`` to ``--out`` and prints the
table. The export's batch range starts at 2 (``compression/bundle.py``): the
program paths refuse batch 1, which is then timed on 2 rows and noted.

Example::

    python -m benchmarks.serve                      # int8 + int4, about 4 minutes (2 cores)
    python -m benchmarks.serve --quick --skip aoti  # smoke: tiny model, few calls
    python -m benchmarks.serve --run outputs/run --bits 8 --out outputs/bench-serve
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serve_paths import PATHS, Rows, Runner, Trained, build_paths, load_run

BATCHES = (1, 64, 512, 4096)
QUICK_CARDINALITY = 50


def train_run(directory: Path, *, bits: int, quick: bool) -> Path:
    """A small ``qat=int{bits}`` run with the serving bundle and a final checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config.compose import CONF_DIR
    from trainer.config.run_dir import register_resolvers
    from trainer.config.schema import register_configs, to_config
    from trainer.train import train

    steps = 2 if quick else 200
    overrides = [
        "trainer=smoke",
        f"qat=int{bits}",
        f"trainer.num_steps={steps}",
        f"trainer.eval_every_steps={steps}",
        f"trainer.checkpoint_every_steps={steps}",
        "trainer.async_checkpoint=false",
        "trainer.eval_batch_size=4096",
        "trainer.export=true",
        "trainer.progress_bar=false",
        "trainer.plot=false",
        f"data.num_eval_samples={4096 if quick else 8192}",
    ]
    if quick:
        overrides += [
            "trainer.batch_size=64",
            f"data.cardinalities=[{','.join([str(QUICK_CARDINALITY)] * 4)}]",
        ]
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    GlobalHydra.instance().clear()
    train(cfg, run_dir=directory)
    return directory


def measure(
    runners: dict[str, Runner],
    rows: Rows,
    *,
    batches: tuple[int, ...],
    threads: int,
    rounds: int,
    calls: int,
) -> list[dict[str, Any]]:
    """Interleaved rounds; one result per (batch, path) that ran."""
    torch.set_num_threads(threads)
    inputs, notes, scores = {}, {}, {}
    times: dict[tuple[int, str], list[float]] = {}
    with torch.no_grad():
        for batch in batches:
            for name, run in runners.items():
                got, notes[batch, name] = _first_call(run, rows, batch)
                inputs[batch, name] = rows.first(2 if notes[batch, name] else batch)
                scores[batch, name] = got[:batch]
                times[batch, name] = []
        for _ in range(rounds):
            for batch in batches:
                n = max(1, min(calls, 4096 // batch))
                for name, run in runners.items():
                    x = inputs[batch, name]
                    for _ in range(n):
                        start = time.perf_counter()
                        run(x)
                        times[batch, name].append(time.perf_counter() - start)
    results = []
    for (batch, name), samples in times.items():
        ref = scores.get((batch, "program"))
        diff = None if ref is None else float((scores[batch, name] - ref).abs().max())
        samples.sort()
        mean = statistics.fmean(samples)
        results.append(
            {
                "threads": threads,
                "batch": batch,
                "path": name,
                "calls": len(samples),
                "p50_ms": 1e3 * samples[len(samples) // 2],
                "p99_ms": 1e3 * samples[min(len(samples) - 1, int(0.99 * len(samples)))],
                "rows_per_s": batch / mean,
                "max_abs_diff": diff,
                "note": notes[batch, name],
            }
        )
    return results


def _first_call(run: Runner, rows: Rows, batch: int) -> tuple[torch.Tensor, str]:
    """The path's scores at ``batch`` (a warm-up call), and a note when batch 1 needed 2 rows."""
    try:
        return run(rows.first(batch)), ""
    except Exception as err:
        if batch != 1:
            raise
        first = str(err).splitlines()[0][:120]
        return run(rows.first(2)), f"batch 1 refused ({first}): timed on 2 rows"


def profile_eager(served_run: Runner, rows: Rows, batches: tuple[int, ...]) -> dict[str, Any]:
    """One thread: each op's self CPU time per row at each batch, and page faults per call."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    out: dict[str, Any] = {"batches": list(batches), "ops": {}, "faults_per_call": {}}
    with torch.no_grad():
        for batch in batches:
            x = rows.first(batch)
            served_run(x)
            reps = max(3, 2048 // batch)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(reps):
                served_run(x)
            out.setdefault("ms_per_call", {})[batch] = 1e3 * (time.perf_counter() - start) / reps
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            out["faults_per_call"][batch] = faults / reps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    served_run(x)
            for event in prof.key_averages():
                per_row_us = event.self_cpu_time_total / reps / batch
                out["ops"].setdefault(event.key, {})[batch] = per_row_us
    return out


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """Markdown: one row per (bits, threads, batch, path), skipped/failed paths included."""
    lines = [
        "| bits | threads | batch | path | p50 ms | p99 ms | rows/s | vs eager "
        "| max abs diff | note |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    keyed = {(r["bits"], r["threads"], r["batch"], r["path"]): r for r in results}
    for bits, threads, batch in sorted({k[:3] for k in keyed}):
        eager = keyed.get((bits, threads, batch, "eager"))
        for path in PATHS:
            r = keyed.get((bits, threads, batch, path))
            status = info[str(bits)]["paths"][path]
            if r is None:
                why = "skipped" if status.get("skipped") else status.get("error", "did not run")
                lines.append(
                    f"| {bits} | {threads} | {batch} | {path} | - | - | - | - | - | {why} |"
                )
                continue
            ratio = f"{r['rows_per_s'] / eager['rows_per_s']:.2f}x" if eager else "-"
            diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            lines.append(
                f"| {bits} | {threads} | {batch} | {path} | {r['p50_ms']:.3f} | "
                f"{r['p99_ms']:.3f} | {r['rows_per_s']:,.0f} | {ratio} | {diff} | {r['note']} |"
            )
    return "\n".join(lines)


def profile_table(prof: dict[str, Any], top: int = 10) -> str:
    """Markdown: the eager module's costliest ops (at the largest batch), per row."""
    small, large = prof["batches"][0], prof["batches"][-1]
    ops = sorted(prof["ops"].items(), key=lambda kv: -kv[1].get(large, 0.0))[:top]
    lines = [
        f"| op | us/row @{small} | us/row @{large} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, per in ops:
        a, b = per.get(small, 0.0), per.get(large, 0.0)
        lines.append(f"| {name[:60]} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.1f} |")
    calls = ", ".join(f"{b}: {ms:.2f} ms" for b, ms in prof["ms_per_call"].items())
    faults = ", ".join(f"{b}: {f:.0f}" for b, f in prof["faults_per_call"].items())
    return "\n".join([*lines, "", f"ms per call: {calls}; minor page faults per call: {faults}"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__)
    parser.add_argument("--run", type=Path, help="a run dir with bundle/ and checkpoints/")
    parser.add_argument("--bits", type=int, nargs="+", help="models to train (default 8 4)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-serve"))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--threads", type=int, nargs="+", help="default: 1 and every core")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 10; quick 2)")
    parser.add_argument("--calls", type=int, default=64, help="calls per round at batch 1")
    parser.add_argument("--skip", nargs="*", default=[], choices=PATHS, help="paths not built")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 2 calls")
    parser.add_argument("--no-profile", action="store_true", help="skip the eager profile")
    args = parser.parse_args(argv)
    from sharding.quiet import quiet_libraries

    quiet_libraries()
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    rounds = args.rounds or (2 if args.quick else 10)
    calls = 2 if args.quick else args.calls
    batches = tuple(args.batches)
    args.out.mkdir(parents=True, exist_ok=True)
    bits_list = args.bits or ([8] if args.quick or args.run else [8, 4])
    results: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for bits in bits_list:
        run = args.run or train_run(args.out / f"int{bits}", bits=bits, quick=args.quick)
        trained: Trained = load_run(run, max_batch=max(batches))
        runners, status = build_paths(trained, skip=set(args.skip), work=args.out / f"int{bits}")
        info[str(bits)] = {"run": str(run), "paths": status}
        for n in threads:
            for r in measure(
                runners, trained.rows, batches=batches, threads=n, rounds=rounds, calls=calls
            ):
                results.append({"bits": bits, **r})
        if not args.no_profile and "eager" in runners:
            small = [b for b in (512, max(batches)) if b in batches] or [max(batches)]
            info[str(bits)]["eager_profile"] = profile_eager(
                runners["eager"], trained.rows, tuple(small)
            )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = f"{platform.processor() or platform.machine()}, {cores} cores, load {load:.1f}"
    md = [
        f"# bench-serve ({when}; {machine}; torch {torch.__version__})",
        "",
        f"`python -m benchmarks.serve {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        table(results, info),
    ]
    for bits, entry in info.items():
        if "eager_profile" in entry:
            md += ["", f"## eager int{bits}, 1 thread: self time per row", ""]
            md.append(profile_table(entry["eager_profile"]))
    text = "\n".join(md) + "\n"
    report = {"when": when, "machine": machine, "results": results, "models": info}
    (args.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_serve.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
