"""The GPU tier (``pytest -m gpu``): NCCL sharding, UVM caching, fp16, QAT export, data.

Skipped without CUDA. On the lent H100/H200 (``scripts/gpu_check.sh``):

- sharded training under NCCL equals unsharded CPU training (the equivalence
  tests' tiny DLRM and reference, tests/test_sharding_equivalence.py): 2 ranks
  when 2 GPUs are visible, else one rank (table_wise, row_wise, data_parallel
  still go through the sharded path: DMP, FBGEMM's CUDA kernels, NCCL);
- the UVM caching kernel (``fused_uvm_caching``, 20% of rows in HBM) trains the
  same rows as the reference: the cache is exact in fp32;
- fp16 with loss scaling on CUDA: fp16 autocast and fp16 tables stay close to
  fp32 from the same weights, losses finite;
- QAT export parity through ``torchrun -m trainer`` on CUDA;
- the synthetic generator draws on the GPU bit for bit what it draws on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.processes import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NUM_GPU_RANKS = 2 if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else 1
CASES = {
    "table_wise": {},
    "row_wise": {},
    "data_parallel": {},
    "uvm_caching": {"strategy": "table_wise", "compute_kernel": "fused_uvm_caching"},
}
# CUDA kernels sum in another order than the CPU reference (measured on H200:
# see benchmarks/GPU.md); a wrong update moves rows by ~0.1.
LOSS_ATOL = 1e-4
ROW_ATOL = 1e-3


def _gpu_config(case: str):
    from tests.test_sharding_equivalence import tiny_config

    spec = CASES[case]
    cfg = tiny_config(spec.get("strategy", case))
    cfg.sharding.device = "cuda"
    if "compute_kernel" in spec:
        cfg.sharding.compute_kernel = spec["compute_kernel"]
    return cfg


def _gpu_worker(rank: int, cases: list[str], out_dir: str) -> None:
    from sharding import destroy_distributed, init_distributed
    from sharding.state import local_shards
    from tests.test_sharding_equivalence import BATCH_SIZE, NUM_STEPS
    from trainer.data import SyntheticCriteo, rank_batches
    from trainer.loop.train_pipeline import drain, make_pipeline
    from trainer.session import build

    env = init_distributed(device="cuda")
    try:
        for case in cases:
            cfg = _gpu_config(case)
            built = build(cfg, env)
            from sharding.state import load_unsharded

            load_unsharded(built.model, torch.load(Path(out_dir) / f"{case}-init.pt"))
            pipeline = make_pipeline("sparse_dist", built.model, built.optimizer, env.device)
            batches = rank_batches(
                SyntheticCriteo(cfg.data),
                "train",
                batch_size=BATCH_SIZE,
                rank=rank,
                world_size=env.world_size,
                num_batches=NUM_STEPS,
            )
            losses = []
            for loss, _logits, _labels in drain(pipeline, batches):
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                losses.append(float(loss) / env.world_size)
            plan = {
                # Plain strings: the files are read back with torch.load's weights_only.
                t: (str(ps.sharding_type), list(ps.ranks or []), str(ps.compute_kernel))
                for mp in built.plan.plan.values()
                for t, ps in mp.items()
            }
            replicated = {
                k: [((0, 0), v.detach().cpu().clone())]
                for k, v in built.model.state_dict().items()
                if "embedding_bags" in k and type(v) is torch.Tensor
            }
            shards = {**replicated, **local_shards(built.model)}
            torch.save(
                {"losses": losses, "shards": shards, "plan": plan},
                Path(out_dir) / f"{case}-rank{rank}.pt",
            )
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory) -> Path:
    from tests.distributed import run_ranks
    from tests.reference import unsharded_model

    out_dir = tmp_path_factory.mktemp("gpu-eq")
    for case in CASES:
        torch.manual_seed(0)
        init = unsharded_model(_gpu_config(case), device=torch.device("cpu")).state_dict()
        torch.save(init, out_dir / f"{case}-init.pt")
    run_ranks(_gpu_worker, list(CASES), str(out_dir), world_size=NUM_GPU_RANKS)
    return out_dir


@pytest.mark.parametrize("case", list(CASES))
def test_nccl_sharded_matches_unsharded(case: str, nccl_runs: Path) -> None:
    from sharding.state import assemble
    from tests.test_sharding_equivalence import _reference

    cfg = _gpu_config(case)
    init = torch.load(nccl_runs / f"{case}-init.pt")
    ranks = [torch.load(nccl_runs / f"{case}-rank{r}.pt") for r in range(NUM_GPU_RANKS)]
    plan = ranks[0]["plan"]
    strategy = CASES[case].get("strategy", case)
    assert {v[0] for v in plan.values()} == {strategy}
    if "compute_kernel" in CASES[case]:
        assert {v[2] for v in plan.values()} == {CASES[case]["compute_kernel"]}
    ref_losses, ref_tables = _reference(
        cfg, init, NUM_GPU_RANKS, {k: (v[0], v[1]) for k, v in plan.items()}
    )
    assert max(ref_losses) - min(ref_losses) > 1e-3
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=LOSS_ATOL, rtol=0
    )
    for key, ref in ref_tables.items():
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        assert not torch.isnan(full).any(), f"{key}: shards do not cover the table"
        assert not torch.equal(ref, init[key]), f"{key}: reference rows never moved"
        torch.testing.assert_close(
            full, ref, atol=ROW_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )


def _fp16_vs_fp32(rank: int, out_dir: str) -> None:
    from sharding import destroy_distributed, init_distributed
    from tests.test_grad_scale import _fresh, fp16_config, train

    env = init_distributed(device="cuda")
    try:
        losses = {}
        for name in ("fp32", "fp16"):
            cfg = fp16_config()
            cfg.sharding.device = "cuda"
            cfg.precision.fp16_on_cpu = False
            if name == "fp32":
                cfg.precision.name = "fp32"
            built = _fresh(cfg, env)
            losses[name] = train(built, env, cfg, first=0, num=6)
            losses[name + "_summary"] = built.converters.summary()
        torch.save(losses, Path(out_dir) / f"fp16-rank{rank}.pt")
    finally:
        destroy_distributed()


def test_fp16_with_loss_scaling_tracks_fp32(tmp_path: Path) -> None:
    from tests.distributed import run_ranks

    run_ranks(_fp16_vs_fp32, str(tmp_path), world_size=1)
    got = torch.load(tmp_path / "fp16-rank0.pt")
    assert got["fp16_summary"].get("precision") == "fp16", got["fp16_summary"]
    assert all(math.isfinite(x) for x in got["fp16"])
    # fp16 tables and autocast round; a missing unscale would blow the updates up by 2**10.
    for a, b in zip(got["fp16"], got["fp32"], strict=True):
        assert abs(a - b) < 2e-2, (got["fp16"], got["fp32"])
    assert got["fp16"][0] != got["fp16"][-1]


def test_qat_export_parity_on_cuda(tmp_path: Path) -> None:
    import sys

    from tests.distributed import free_port
    from tests.test_train_e2e import TINY

    # python -m torch.distributed.run: the GPU image need not have a torchrun script.
    proc = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={NUM_GPU_RANKS}",
            f"--master_port={free_port()}",
            "-m",
            "trainer",
            "sharding.device=cuda",
            "qat=int8",
            "trainer.export=true",
            *TINY,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    export = summary["export"]
    assert export["max_abs_logit_diff"] <= 1e-4, export
    assert abs(export["auc"] - summary["auc"]) < 1e-3


def test_generator_draws_the_same_samples_on_the_gpu() -> None:
    from trainer.data import SyntheticCriteo, SyntheticDataConfig

    cfg = SyntheticDataConfig(cardinalities=[7, 50, 1000, 40_000_000], hotness=[1, 3, 1, 20])
    cpu = SyntheticCriteo(cfg).batch("train", 4096, 512)
    gpu = SyntheticCriteo(cfg).to(torch.device("cuda")).batch("train", 4096, 512)
    assert gpu.labels.is_cuda and gpu.sparse_features.values().is_cuda
    torch.testing.assert_close(gpu.dense_features.cpu(), cpu.dense_features, rtol=0, atol=1e-6)
    assert torch.equal(gpu.sparse_features.values().cpu(), cpu.sparse_features.values())
    assert torch.equal(gpu.sparse_features.lengths().cpu(), cpu.sparse_features.lengths())
    # Labels compare a uniform with a float64 probability: exp/log may differ in the
    # last bit on the GPU, flipping a label only where u is within 1e-15 of p.
    assert (gpu.labels.cpu() != cpu.labels).sum() <= 1


def test_host_batches_reach_a_gpu_step_pinned_and_train_the_same(compose_cfg, tmp_path) -> None:
    """``trainer.prefetch=auto`` on a GPU fed from prepared shards: the batches are
    built ahead and pinned (so the pipeline's non-blocking copy is asynchronous), and
    training is the inline run's up to the GPU's summation order."""
    from tests.test_prefetch import train_from_shards
    from trainer.data import SyntheticCriteo, SyntheticDataConfig
    from trainer.data.prefetch import input_ahead

    host = SyntheticCriteo(SyntheticDataConfig(cardinalities=[7, 50], hotness=[1, 3]))
    batches = iter([host.batch("train", 0, 64), host.batch("train", 64, 64)])
    with input_ahead(batches, mode="auto", device=torch.device("cuda")) as ahead:
        for batch in ahead:
            assert batch.dense_features.is_pinned() and batch.labels.is_pinned()
            assert batch.sparse_features.values().is_pinned()

    runs = train_from_shards(compose_cfg, tmp_path, ("off", "auto"), "sharding.device=cuda")
    assert runs["auto"]["device"].startswith("cuda")
    assert abs(runs["auto"]["auc"] - runs["off"]["auc"]) < 1e-4, runs
    assert abs(runs["auto"]["logloss"] - runs["off"]["logloss"]) < 1e-5, runs
