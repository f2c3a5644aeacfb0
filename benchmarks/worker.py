"""One rank of ``make bench``: every contender of one shape, in the same processes.

Launched by ``benchmarks.bench`` under torchrun (gloo on CPU, NCCL on CUDA).
All contenders are built in each process, warmed up, then timed in interleaved
rounds (each round runs every contender once, in a rotated order), so that the
noise of a shared machine hits them alike. A round's time is the slowest rank's,
between barriers. Rank 0 writes the JSON that ``benchmarks.bench`` reads.

Example::

    torchrun --standalone --nproc_per_node=2 -m benchmarks.worker \
        --shape small --steps 20 --repeats 5 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import models
from benchmarks.baselines import make_dense, make_pytorch, make_torchrec
from benchmarks.models import (
    SHAPES,
    Contender,
    barrier,
    dcnv2_shape,
    draw_batches,
    make_shardrec,
    make_source,
)

CONTENDERS = (
    "shardrec",
    "shardrec_prefetch",
    "shardrec_pregen",
    "shardrec_staged",
    "shardrec_fbgemm",
    "pytorch",
    "torchrec",
    "dense",
)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slowest(seconds: float, env: Any) -> float:
    if env.world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    if env.device.type == "cuda":
        t = t.to(env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_steps(contender: Contender, steps: int, env: Any) -> float:
    barrier(env)
    began = time.perf_counter()
    contender.step(steps)
    barrier(env)
    return slowest(time.perf_counter() - began, env)


_LABEL = re.compile(r"^## ([a-z_]+?)(?: \d+)? ##$")
_COMM = ("alltoall", "all_to_all", "allreduce", "all_reduce", "allgather", "all_gather")
_SYNC = ("aten::_local_scalar_dense",)


def breakdown(contender: Contender, *, steps: int, env: Any, batch_size: int) -> dict[str, Any]:
    """Where shardrec's step goes: the pipeline's own labels under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    # Input alone: drawing the batches, outside any step.
    source = contender.source
    it = source.train_batches(
        batch_size=batch_size, rank=env.rank, world_size=env.world_size, first_step=0, num_steps=4
    )
    began = time.perf_counter()
    for batch in it:
        if env.device.type == "cuda":
            batch.labels.sum().item()
    input_alone_ms = (time.perf_counter() - began) * 1e3 / 4

    plain_s = time_steps(contender, steps, env)
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        profiled_s = time_steps(contender, steps, env)
    totals: dict[str, float] = {}
    comm_ms = sync_ms = 0.0
    num_syncs = 0
    for event in prof.key_averages():
        match = _LABEL.match(event.key)
        total_ms = event.cpu_time_total / 1e3
        if match:
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + total_ms
        elif any(c in event.key.lower() for c in _COMM) and event.key.startswith("c10d::"):
            comm_ms += total_ms
        elif event.key in _SYNC:
            sync_ms += total_ms
            num_syncs += event.count
    per_step = {k: v / steps for k, v in totals.items()}
    step_ms = plain_s * 1e3 / steps
    profiled_step_ms = profiled_s * 1e3 / steps
    accounted = sum(per_step.values())
    return {
        "step_ms": step_ms,
        "profiled_step_ms": profiled_step_ms,
        "input_alone_ms": input_alone_ms,
        "labels_ms": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
        "comm_ms": comm_ms / steps,
        "host_syncs_per_step": num_syncs / steps,
        "host_sync_ms": sync_ms / steps,
        "unlabelled_ms": max(profiled_step_ms - accounted, 0.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--breakdown-steps", type=int, default=10)
    p.add_argument("--pool", type=int, default=8, help="batches drawn up front, cycled")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-rows", type=int, default=4_000_000, help="dcnv2: rows cap per table")
    p.add_argument("--shardrec-overrides", default="", help="space-separated Hydra overrides")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from sharding import destroy_distributed, init_distributed
    from sharding.quiet import quiet_libraries

    quiet_libraries()
    models.EXTRA_OVERRIDES.extend(args.shardrec_overrides.split())
    if args.device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = init_distributed(device=args.device)
    try:
        if args.shape == "dcnv2":
            shape = dcnv2_shape(max_rows=args.max_rows, batch_size=args.batch_size or 16384)
        else:
            shape = SHAPES[args.shape]
            if args.batch_size:
                import dataclasses

                shape = dataclasses.replace(shape, batch_size=args.batch_size)
        names = [n for n in args.contenders.split(",") if n]
        unknown = sorted(set(names) - set(CONTENDERS))
        if unknown:
            raise SystemExit(f"bench: unknown contenders {unknown}; pick from {CONTENDERS}")
        result: dict[str, Any] = {
            "shape": shape.name,
            "world_size": env.world_size,
            "batch_size": shape.batch_size,
            "device": str(env.device),
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "pool": args.pool,
            "contenders": {},
        }
        contenders: list[Contender] = []
        source = batches = None
        for name in names:
            rss_before = rss_mb()
            if name in ("shardrec", "shardrec_prefetch", "shardrec_staged", "shardrec_fbgemm"):
                c = make_shardrec(
                    shape,
                    env=env,
                    device=args.device,
                    prefetch=name == "shardrec_prefetch",
                    staged=name == "shardrec_staged",
                    fbgemm_backward=name == "shardrec_fbgemm",
                    source=source,
                )
                source = c.source
            else:
                if batches is None:
                    if source is None:
                        source = make_source(shape, env=env, device=args.device)
                    batches = draw_batches(
                        source, shape, rank=env.rank, world_size=env.world_size, num=args.pool
                    )
                if name == "shardrec_pregen":
                    c = make_shardrec(
                        shape, env=env, device=args.device, source=source, batches=batches
                    )
                else:
                    make = {"pytorch": make_pytorch, "torchrec": make_torchrec, "dense": make_dense}
                    c = make[name](shape, env=env, batches=batches)
            time_steps(c, args.warmup, env)
            contenders.append(c)
            result["contenders"][name] = {
                "rss_added_mb": rss_mb() - rss_before,
                "samples_per_sec": [],
            }
            if env.device.type == "cuda":
                result["contenders"][name]["cuda_peak_gb"] = (
                    torch.cuda.max_memory_allocated() / 2**30
                )
        global_batch = shape.batch_size * env.world_size
        for r in range(args.repeats):
            for i in range(len(contenders)):
                c = contenders[(i + r) % len(contenders)]
                seconds = time_steps(c, args.steps, env)
                result["contenders"][c.name]["samples_per_sec"].append(
                    args.steps * global_batch / seconds
                )
        shardrec = next((c for c in contenders if c.name == "shardrec"), None)
        if shardrec is not None and args.breakdown_steps > 0:
            result["breakdown"] = breakdown(
                shardrec, steps=args.breakdown_steps, env=env, batch_size=shape.batch_size
            )
        result["peak_rss_mb"] = peak_rss_mb()
        if env.rank == 0:
            Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
