"""What drawing one synthetic batch costs, part by part, on one thread.

Builds the synthetic source of a ``make bench`` shape (``benchmarks.models``:
the same config shardrec trains on), then times ``next()`` over
``train_batches`` (rank 0 of 2, batch 2048 per rank by default), and the draw's
stages alone on the same samples: the dense normals, the id hashes and Zipf
ranks, the planted logit, the labels and the KJT. Medians over ``--repeats``
rounds of ``--steps`` batches, ms per batch.

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.draw_profile --shapes small,multihot
    SHARDREC_FUSED_DRAW=0 OMP_NUM_THREADS=1 python -m benchmarks.draw_profile  # staged
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.models import SHAPES, compose_config, shardrec_overrides
from trainer.config.validate import open_source
from trainer.data.rng import stream_key, uniform
from trainer.data.slot_draw import fused_available


def _ms(fn: Callable[[], object], *, repeats: int, per: int) -> float:
    """Median wall ms of ``fn`` over ``repeats`` calls, divided by ``per``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3 / per)
    return statistics.median(times)


def profile_shape(name: str, *, batch_size: int, steps: int, repeats: int) -> dict[str, float]:
    """ms per batch of ``next(train_batches)`` and of each stage of the draw."""
    shape = SHAPES[name]
    cfg = compose_config(shardrec_overrides(shape, device="cpu")).data
    source = open_source(cfg)

    def batches(first: int) -> None:
        it = source.train_batches(
            batch_size=batch_size, rank=0, world_size=2, first_step=first, num_steps=steps
        )
        for _ in it:
            pass

    batches(0)  # warm-up
    out = {"next(batch)": _ms(lambda: batches(steps), repeats=repeats, per=steps)}
    indices = torch.arange(batch_size * steps, dtype=torch.int64)
    draw = source._draw_with_head("train", indices)
    stages: dict[str, Callable[[], object]] = {
        "ids, ranks, dense": lambda: source._draw_with_head("train", indices),
        "planted logit": lambda: source._planted.logits(*draw),
        "labels (uniform)": lambda: uniform(stream_key(source._seed, "train", "label"), indices),
        "rank -> id": lambda: source._tables.ids(draw[1], source._slot_features),
        "KJT": lambda: source._jagged(source._tables.ids(draw[1], source._slot_features), draw[2]),
    }
    for stage, fn in stages.items():
        fn()
        out[stage] = _ms(fn, repeats=repeats, per=steps)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draw_profile", description=__doc__)
    p.add_argument("--shapes", default="small,multihot")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8, help="batches per timed round")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # SHARDREC_FUSED_DRAW=0: the staged torch draw instead (trainer/data/slot_draw.py).
    print(f"slot draw: {'fused (numba)' if fused_available() else 'staged (torch)'}")
    for name in args.shapes.split(","):
        row = profile_shape(
            name, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats
        )
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
