"""Side-by-side op profile: shardrec's step against torchrec's golden loop, same batches.

Builds ``shardrec_pregen`` (the trainer's real pipeline and model over batches
drawn up front) and the ``torchrec`` contender (``benchmarks.baselines``) in the
same processes, warms both up, profiles ``--steps`` steps of each with
torch.profiler, and writes on rank 0 one table comparing them op by op: calls
and self CPU time per step, sorted by the difference. What shardrec's step does
that torchrec's does not shows up at the top.

Example::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m benchmarks.op_profile \
        --shape small --steps 10 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import models
from benchmarks.baselines import make_torchrec
from benchmarks.models import SHAPES, draw_batches, make_shardrec, make_source
from benchmarks.worker import time_steps


def profile_steps(contender: Any, *, steps: int, env: Any) -> tuple[float, dict[str, Any]]:
    """Wall ms per step (unprofiled) and the profiler's per-op totals per step."""
    from torch.profiler import ProfilerActivity, profile

    plain_ms = time_steps(contender, steps, env) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(contender, steps, env)
    ops = {
        e.key: {
            "calls": e.count / steps,
            "self_ms": e.self_cpu_time_total / 1e3 / steps,
            "total_ms": e.cpu_time_total / 1e3 / steps,
        }
        for e in prof.key_averages()
    }
    return plain_ms, ops


def compare(a: dict[str, Any], b: dict[str, Any], *, top: int) -> str:
    keys = sorted(
        set(a) | set(b),
        key=lambda k: -abs(a.get(k, {}).get("self_ms", 0) - b.get(k, {}).get("self_ms", 0)),
    )
    zero = {"calls": 0.0, "self_ms": 0.0, "total_ms": 0.0}
    lines = [
        "| op | shardrec calls | shardrec self ms | torchrec calls | torchrec self ms | diff ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in keys[:top]:
        x, y = a.get(k, zero), b.get(k, zero)
        lines.append(
            f"| {k[:70]} | {x['calls']:.1f} | {x['self_ms']:.2f} | {y['calls']:.1f} "
            f"| {y['self_ms']:.2f} | {x['self_ms'] - y['self_ms']:+.2f} |"
        )
    return "\n".join(lines)


def plan_summary(model: Any) -> str:
    """Per table: sharding type, kernel and ranks, as '<type>/<kernel>@ranks'."""
    parts = []
    for module_plan in model.plan.plan.values():
        for table, ps in module_plan.items():
            parts.append(f"{table}: {ps.sharding_type}/{ps.compute_kernel}@{ps.ranks}")
    return "; ".join(parts)


def with_torchrec_parts(contender: Any, *, interaction: bool) -> Any:
    """``contender`` with torchrec's DLRM forward order put back (``DLRM.forward``: the
    bottom MLP before the lookup) and, if ``interaction``, torchrec's InteractionArch."""
    from torchrec.models.dlrm import InteractionArch

    dlrm = contender.model.module.model
    dlrm.__class__ = dlrm.__class__.__mro__[2]  # SparseFirstDLRM -> _SparseFirst -> DLRM
    if interaction:
        dlrm.inter_arch = InteractionArch(num_sparse_features=dlrm.inter_arch.F)
    return contender


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--rounds", type=int, default=4, help="unprofiled alternating rounds")
    p.add_argument("--shardrec-overrides", default="")
    p.add_argument(
        "--ab",
        action="store_true",
        help="also time shardrec with torchrec's forward order, and with its interaction too",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from sharding import destroy_distributed, init_distributed
    from sharding.quiet import quiet_libraries

    quiet_libraries()
    models.EXTRA_OVERRIDES.extend(args.shardrec_overrides.split())
    torch.set_num_threads(1)
    env = init_distributed(device="cpu")
    try:
        shape = SHAPES[args.shape]
        source = make_source(shape, env=env, device="cpu")
        batches = draw_batches(source, shape, rank=env.rank, world_size=env.world_size, num=8)
        shardrec = make_shardrec(shape, env=env, device="cpu", source=source, batches=batches)
        torchrec = make_torchrec(shape, env=env, batches=batches)
        for c in (shardrec, torchrec):
            time_steps(c, args.warmup, env)
        a_ms, a_ops = profile_steps(shardrec, steps=args.steps, env=env)
        b_ms, b_ops = profile_steps(torchrec, steps=args.steps, env=env)
        timed = {"shardrec": shardrec, "torchrec": torchrec}
        if args.ab:
            for name, interaction in (("torchrec order", False), ("torchrec order+inter", True)):
                c = make_shardrec(shape, env=env, device="cpu", source=source, batches=batches)
                timed[f"shardrec, {name}"] = with_torchrec_parts(c, interaction=interaction)
                time_steps(c, args.warmup, env)
        # Unprofiled rounds, the order rotating each round, for the noise.
        rounds: dict[str, list[float]] = {name: [] for name in timed}
        rounds["shardrec"].append(a_ms)
        rounds["torchrec"].append(b_ms)
        names = list(timed)
        for r in range(args.rounds):
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                rounds[name].append(time_steps(timed[name], args.steps, env) * 1e3 / args.steps)
        if env.rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            medians = ", ".join(
                f"{name} {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
                for name, xs in rounds.items()
            )
            text = (
                f"# {args.shape}: shardrec_pregen vs torchrec loop, {args.steps} steps\n\n"
                f"ms per step (unprofiled, median (min-max) of rotating rounds): {medians}\n\n"
                f"shardrec plan: {plan_summary(shardrec.model)}\n\n"
                "shardrec's pipelined (input dist overlapped) modules: "
                f"{len(shardrec.trainer.pipeline._pipelined_modules)}\n\n"
                f"torchrec plan: {plan_summary(torchrec.model)}\n\n"
                + compare(a_ops, b_ops, top=args.top)
                + "\n\nshardrec's own ops by self CPU time (ms per step):\n\n"
                + ", ".join(
                    f"{k} {v['self_ms']:.2f}"
                    for k, v in sorted(a_ops.items(), key=lambda kv: -kv[1]["self_ms"])[:25]
                    if not k.startswith("##")
                )
            )
            (out / f"{args.shape}.md").write_text(text + "\n")
            print(text)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
