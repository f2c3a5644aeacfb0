"""FBGEMM's fused CPU embedding backward alone, by how the ids are spread.

The multi-hot bench shape spends about half its step in FBGEMM's CPU backward
with the fused row-wise Adagrad (``benchmarks.op_profile``). This times that
kernel alone, one process, one thread (``--threads``): a
``SplitTableBatchedEmbeddingBagsCodegen`` of ``--tables`` tables (``--rows`` x
``--dim``, the bench shapes' sizes) on one batch whose bags follow
``--hotness``, with the same lookups laid out four ways: Zipf-like ids (a heavy
tail, as the synthetic data), uniform ids, the Zipf ids sorted (the whole index
array: not a real batch, it shows what the backward's CSR-to-CSC sort costs),
and one id per table. Each layout runs on two kernels that start from the same
weights: FBGEMM's backward, and the compiled one shardrec uses on a CPU
(``sharding.tbe_cpu``), whose weights and accumulators must come out equal, bit
for bit, after every pass (printed). Medians of ``--repeats`` forward and
backward passes, ms.

Example::

    python -m benchmarks.tbe_backward                      # the multi-hot shape
    python -m benchmarks.tbe_backward --hotness 1          # the small shape's bags
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _times(tbe: torch.nn.Module, indices: torch.Tensor, offsets: torch.Tensor, repeats: int):
    """Median forward and backward ms of ``tbe`` on one batch (after 2 warm-up passes)."""
    forward, backward = [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        out = tbe(indices, offsets)
        t1 = time.perf_counter()
        grad = torch.randn(out.shape, generator=gen)
        t1b = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        if i >= 2:
            forward.append((t1 - t0) * 1e3)
            backward.append((t2 - t1b) * 1e3)
    return statistics.median(forward), statistics.median(backward)


def parse_hotness(spec: str, tables: int) -> list[int]:
    """``"20x8,1x18"`` -> 8 bags of 20 ids then 18 of 1; a single ``"H"``: every table."""
    hotness = []
    for part in spec.split(","):
        size, _, count = part.partition("x")
        hotness += [int(size)] * int(count or 1)
    if len(hotness) == 1:
        hotness *= tables
    if len(hotness) != tables:
        raise SystemExit(f"--hotness {spec!r} names {len(hotness)} tables, --tables is {tables}")
    return hotness


def main(argv: list[str] | None = None) -> None:
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        OptimType,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from sharding import tbe_cpu

    p = argparse.ArgumentParser(prog="python -m benchmarks.tbe_backward", description=__doc__)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument(
        "--hotness", default="20x8,1x18", help="bag sizes: 'HxN,...' (N tables of H ids)"
    )
    p.add_argument("--tail", type=float, default=0.2, help="Zipf-like tail exponent of the ids")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hotness = parse_hotness(args.hotness, args.tables)

    def kernel() -> SplitTableBatchedEmbeddingBagsCodegen:
        torch.manual_seed(0)
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(args.rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * args.tables,
            optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=0.05,
            pooling_mode=PoolingMode.SUM,
        )

    fbgemm, compiled = kernel(), kernel()
    if not tbe_cpu.compiled_case(compiled) or tbe_cpu._load() is None:
        raise SystemExit("the compiled backward does not run here (numba missing?)")
    compiled.__class__ = tbe_cpu.CompiledBackwardTBE
    gen = torch.Generator().manual_seed(0)
    n = args.batch_size * sum(hotness)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    zipf = ((1 - u) ** (-1 / args.tail) - 1).clamp(max=args.rows - 1).long()
    lengths = torch.cat([torch.full((args.batch_size,), h) for h in hotness])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    layouts = {
        "Zipf-like ids": zipf,
        "uniform ids": torch.randint(0, args.rows, (n,), generator=gen),
        "Zipf ids sorted": torch.sort(zipf).values,
        "one id per table": torch.full((n,), 7),
    }
    print(
        f"{args.tables} tables of {args.rows:,} x {args.dim}, batch {args.batch_size}, "
        f"{n:,} lookups, row-wise Adagrad, {args.threads} thread(s) (medians of {args.repeats})"
    )
    print("| ids | forward ms | FBGEMM backward ms | compiled backward ms | updates equal |")
    print("| --- | --- | --- | --- | --- |")
    for name, indices in layouts.items():
        fw, bw = _times(fbgemm, indices, offsets, args.repeats)
        _, cbw = _times(compiled, indices, offsets, args.repeats)
        same = torch.equal(fbgemm.weights_host, compiled.weights_host) and torch.equal(
            fbgemm.momentum1_host, compiled.momentum1_host
        )
        print(f"| {name} | {fw:.1f} | {bw:.1f} | {cbw:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
