"""How close FBGEMM's fused embedding forward gets to the GPU's memory bandwidth.

Times, in the same process and on the same device, (1) the forward of one
``SplitTableBatchedEmbeddingBagsCodegen`` (the kernel torchrec's fused tables
run) over the MLPerf DLRM-DCNv2 tables (dim 128, 214 ids per sample, rows
capped at ``--max-rows``) and (2) a device-to-device copy of as many bytes as
the forward reads. The forward reads one row per id and writes one pooled row
per (sample, table); the copy reads and writes its bytes once. The fraction is
the forward's bytes per second over the copy's. Ids are uniform (every lookup
misses the caches: the honest case) and Zipf (as the synthetic data draws them).

Example::

    python -m benchmarks.gpu_bandwidth --batch-size 16384 --max-rows 4000000 --out bw.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def cuda_time_ms(fn, *, iters: int) -> float:
    """Median of ``iters`` CUDA-event timings of ``fn``, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--max-rows", type=int, default=4_000_000)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bandwidth: needs CUDA (this measures GPU memory bandwidth)")

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        ComputeDevice,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from benchmarks.models import dcnv2_shape
    from trainer.data.zipf import ZipfTables

    device = torch.device("cuda")
    shape = dcnv2_shape(max_rows=args.max_rows, batch_size=args.batch_size)
    rows, hotness, dim = shape.table_rows(), shape.hotness_per_table(), shape.embedding_dim
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(r, dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for r in rows],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.05,
        pooling_mode=PoolingMode.SUM,
        device=device,
    )
    b = args.batch_size
    # TBE's layout: table-major, then sample; every bag has exactly hotness ids here.
    lengths = torch.tensor(hotness, device=device).repeat_interleave(b)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    num_ids = int(offsets[-1])
    gen = torch.Generator(device=device).manual_seed(0)
    table_of_id = torch.arange(len(rows), device=device).repeat_interleave(
        torch.tensor(hotness, device=device) * b
    )
    cards = torch.tensor(rows, device=device, dtype=torch.int64)
    uniform_ids = (
        torch.rand(num_ids, device=device, generator=gen, dtype=torch.float64) * cards[table_of_id]
    ).long()
    zipf = ZipfTables(rows, exponent=1.2, seed=0).to(device)
    u = torch.rand(num_ids, device=device, generator=gen, dtype=torch.float64)
    zipf_ids = zipf.ids(zipf.ranks(u, table_of_id), table_of_id)

    read_bytes = num_ids * dim * 4
    write_bytes = b * len(rows) * dim * 4
    src = torch.empty(read_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), iters=args.iters)
    copy_gbps = 2 * read_bytes / copy_ms / 1e6
    result = {
        "device": torch.cuda.get_device_name(),
        "batch_size": b,
        "num_ids": num_ids,
        "embedding_dim": dim,
        "table_rows": rows,
        "read_bytes": read_bytes,
        "write_bytes": write_bytes,
        "copy_ms": copy_ms,
        "copy_gbps": copy_gbps,
    }
    with torch.no_grad():
        for name, ids in (("uniform", uniform_ids), ("zipf", zipf_ids)):
            ms = cuda_time_ms(lambda ids=ids: tbe(ids, offsets), iters=args.iters)
            gbps = (read_bytes + write_bytes) / ms / 1e6
            result[f"forward_{name}_ms"] = ms
            result[f"forward_{name}_gbps"] = gbps
            result[f"forward_{name}_fraction_of_copy"] = gbps / copy_gbps
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
