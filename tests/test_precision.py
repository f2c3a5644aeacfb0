"""Mixed precision: what each setting means per device, and that 16-bit tables
really halve the bytes each rank holds while training still runs."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import DataType

from compression.grad_scale import LossScaledOptimizer
from compression.precision import resolve_precision
from sharding import destroy_distributed, init_distributed
from sharding.state import local_table_bytes
from tests.test_sharding_equivalence import tiny_config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain, make_pipeline
from trainer.session import build


def test_resolution_per_device() -> None:
    assert resolve_precision("fp32", device_type="cpu").autocast_dtype is None
    bf16_cpu = resolve_precision("bf16", device_type="cpu")
    assert bf16_cpu.autocast_dtype == torch.bfloat16
    assert bf16_cpu.table_data_type == DataType.FP16  # no bf16 tables in FBGEMM's CPU kernel
    bf16_gpu = resolve_precision("bf16", device_type="cuda")
    assert bf16_gpu.table_data_type == DataType.BF16
    fp16_cpu = resolve_precision("fp16", device_type="cpu")
    assert fp16_cpu.autocast_dtype == torch.bfloat16 and fp16_cpu.table_data_type == DataType.FP16
    assert fp16_cpu.fused_params == {"stochastic_rounding": True}
    assert not fp16_cpu.loss_scaling and not bf16_gpu.loss_scaling
    # fp16 dense compute takes a loss scale (tests/test_grad_scale.py runs it on CPU).
    fp16_gpu = resolve_precision("fp16", device_type="cuda")
    assert fp16_gpu.autocast_dtype == torch.float16 and fp16_gpu.table_data_type == DataType.FP16
    assert fp16_gpu.loss_scaling
    assert resolve_precision("fp16", device_type="cpu", fp16_on_cpu=True) == fp16_gpu
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        resolve_precision("int3", device_type="cpu")


def train_briefly(precision: str, *, qat_bits: int = 0, fp16_on_cpu: bool = False) -> dict:
    """20 in-process steps of the tiny table-wise model: losses, table bytes, the dtype a
    dense Linear computed in, whether the optimizer scales the loss (fp16)."""
    cfg = tiny_config("table_wise")
    cfg.precision.name, cfg.precision.fp16_on_cpu = precision, fp16_on_cpu
    cfg.qat.bits = qat_bits
    env = init_distributed(device="cpu")
    try:
        torch.manual_seed(0)
        built = build(cfg, env)
        # The dtype a dense Linear actually computes in, seen inside the forward.
        seen_dtypes: list[torch.dtype] = []
        linear = next(m for m in built.model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda _m, _i, out: seen_dtypes.append(out.dtype))
        pipeline = make_pipeline(
            "sparse_dist",
            built.model,
            built.optimizer,
            env.device,
            model_fwd=built.converters.wrap_forward(built.model),
        )
        batches = rank_batches(
            SyntheticCriteo(cfg.data), "train", batch_size=64, rank=0, world_size=1, num_batches=20
        )
        return {
            "losses": [float(loss) for loss, _, _ in drain(pipeline, batches)],
            "bytes": local_table_bytes(built.model),
            "dtype": seen_dtypes[0],
            "loss_scaled": isinstance(built.optimizer, LossScaledOptimizer),
        }
    finally:
        destroy_distributed()


def test_fp16_tables_halve_bytes_and_still_learn() -> None:
    fp32, bf16 = train_briefly("fp32"), train_briefly("bf16")
    fp32_bytes, fp32_losses = fp32["bytes"], fp32["losses"]
    bf16_bytes, bf16_losses, dtype = bf16["bytes"], bf16["losses"], bf16["dtype"]
    assert bf16_bytes * 2 == fp32_bytes
    assert dtype == torch.bfloat16
    # Both learn, and 16-bit rounding keeps them close but not identical.
    assert bf16_losses[-1] < bf16_losses[0] and fp32_losses[-1] < fp32_losses[0]
    assert bf16_losses != fp32_losses
    assert abs(bf16_losses[-1] - fp32_losses[-1]) < 0.05


def test_16bit_data_parallel_tables_with_adam_are_refused(compose_cfg, tmp_path) -> None:
    """Measured: bf16 data-parallel tables under Adam turn nan by step 2; refused at build."""
    from trainer.config.schema import ConfigError, to_config
    from trainer.train import train

    cfg = to_config(compose_cfg(["trainer=smoke", "sharding=data_parallel", "precision=bf16"]))
    with pytest.raises(ConfigError, match=r"data_parallel.*dense_optimizer=adam.*table_wise"):
        train(cfg, run_dir=tmp_path)
