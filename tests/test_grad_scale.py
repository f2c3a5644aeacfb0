"""fp16 loss scaling with the tables' optimizer inside backward (compression/grad_scale.py).

CPU runs fp16 dense compute as bf16 by default; ``precision.fp16_on_cpu=true``
takes the CUDA path (fp16 autocast, fp16 tables, loss scaling) so the mechanism
runs for real here, through the trainer's build and pipeline:

- a finite scale S changes nothing but rounding: rows, FBGEMM's row-wise
  Adagrad state, dense weights and Adam state equal the S=1 run's (a missing or
  doubled unscale would put a factor S, or S^2 in the second moments);
- an overflow skips the step everywhere: rows and Adagrad state stay exactly as
  they were (a zero gradient is a no-op for FBGEMM's kernel), dense weights and
  Adam state too, and the scale backs off. Two ways in: an absurd scale (every
  gradient overflows) and an inf injected only into the tables' gradient (the
  dense gradients stay finite, so only the boundary's flag can skip them);
- the losses the pipeline returns are unscaled;
- on two gloo ranks, with table-wise, row-wise, column-wise and data-parallel
  tables, the same holds, and an inf on rank 0 alone skips every rank's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.models.dlrm import SparseArch

from compression.grad_scale import LossScaledOptimizer
from sharding import DistEnv, destroy_distributed, init_distributed
from tests.distributed import run_ranks
from tests.test_sharding_equivalence import tiny_config
from trainer.config.schema import Config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain, make_pipeline
from trainer.session import Built, build

BATCH_SIZE = 16
NUM_STEPS = 3
SCALE = 2.0**10
ABSURD_SCALE = 2.0**126  # finite in fp32, inf once a gradient is cast to fp16


def fp16_config(*, mixed_plan: bool = False, loss_scale: float = SCALE) -> Config:
    """The equivalence tests' tiny DLRM in fp16; ``mixed_plan``: their 2-rank mixed plan."""
    cfg = tiny_config("column_wise", overrides=True) if mixed_plan else tiny_config("table_wise")
    if mixed_plan:
        # SGD: Adam's second moment underflows in a 16-bit data-parallel table (nan
        # after one step, with or without loss scaling). A large lr so that updates
        # exceed the fp16 rounding step and a wrong unscale shows.
        cfg.optim.dense_optimizer, cfg.optim.dense_lr = "sgd", 0.5
    cfg.precision.name = "fp16"
    cfg.precision.fp16_on_cpu = True
    cfg.precision.loss_scale = loss_scale
    return cfg


def _local(value: Any) -> list[torch.Tensor]:
    if isinstance(value, ShardedTensor):
        return [s.tensor.detach().clone() for s in value.local_shards()]
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    return []


def snapshot(built: Built) -> dict[str, list[torch.Tensor]]:
    """This rank's weights and optimizer state (fused Adagrad momentum, Adam moments)."""
    out = {f"weight/{k}": _local(v) for k, v in built.model.state_dict().items()}
    for key, state in built.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if name != "step":
                out[f"state/{key}/{name}"] = _local(value)
    return {k: v for k, v in out.items() if v}


def assert_close(
    got: dict[str, list[torch.Tensor]], want: dict[str, list[torch.Tensor]], **tol: float
) -> None:
    assert got.keys() == want.keys()
    for key in want:
        for a, b in zip(got[key], want[key], strict=True):
            torch.testing.assert_close(a.float(), b.float(), msg=key, **tol)


def train(built: Built, env: DistEnv, cfg: Config, *, first: int, num: int) -> list[float]:
    fwd = built.converters.wrap_forward(built.model)
    pipeline = make_pipeline(
        cfg.trainer.pipeline, built.model, built.optimizer, env.device, model_fwd=fwd
    )
    batches = rank_batches(
        SyntheticCriteo(cfg.data),
        "train",
        batch_size=BATCH_SIZE,
        rank=env.rank,
        world_size=env.world_size,
        num_batches=num,
        first_batch=first,
    )
    return [float(loss) for loss, _logits, _labels in drain(pipeline, batches)]


def poison_table_grads(built: Built, *, rank: int, on_rank: int = 0) -> None:
    """An inf in the gradient reaching the boundary (on ``on_rank``): only the tables see it."""

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and rank == on_rank:
            output.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))

    for m in built.model.modules():
        if isinstance(m, SparseArch):
            m.register_forward_hook(hook)  # after the boundary's hook: sees its output


def _fresh(cfg: Config, env: DistEnv) -> Built:
    torch.manual_seed(0)
    return build(cfg, env)


def _single_rank(fn: Callable[[DistEnv], Any]) -> Any:
    env = init_distributed(device="cpu")
    try:
        return fn(env)
    finally:
        destroy_distributed()


def test_finite_scale_is_only_rounding_and_losses_stay_unscaled() -> None:
    def run(env: DistEnv) -> None:
        results = {}
        for scale in (1.0, SCALE):
            cfg = fp16_config(loss_scale=scale)
            built = _fresh(cfg, env)
            assert isinstance(built.optimizer, LossScaledOptimizer)
            losses = train(built, env, cfg, first=0, num=NUM_STEPS)
            assert built.optimizer.loss_scale.get_scale() == scale  # no overflow, no growth yet
            results[scale] = losses, snapshot(built)
        (ref_losses, ref), (losses, got) = results[1.0], results[SCALE]
        # The first forward is identical; later ones differ by fp16 rounding at most.
        assert losses[0] == ref_losses[0] and 0.5 < losses[0] < 1.0
        assert losses == pytest.approx(ref_losses, abs=1e-3)
        # fp16 rows differ by a rounding step (stochastic rounding of slightly
        # different updates); a wrong unscale would be off by a factor of S or S^2.
        assert_close(got, ref, rtol=1e-2, atol=5e-4)

    _single_rank(run)


def test_base_pipeline_scales_the_loss_too() -> None:
    def run(env: DistEnv) -> None:
        out = {}
        for pipeline in ("sparse_dist", "base"):
            cfg = fp16_config()
            cfg.trainer.pipeline = pipeline
            built = _fresh(cfg, env)
            out[pipeline] = train(built, env, cfg, first=0, num=NUM_STEPS), snapshot(built)
        assert out["base"][0] == out["sparse_dist"][0]
        assert_close(out["base"][1], out["sparse_dist"][1], rtol=0, atol=0)

    _single_rank(run)


@pytest.mark.parametrize("overflow", ["absurd_scale", "table_grad_only"])
def test_overflow_skips_tables_and_dense_and_backs_off(overflow: str) -> None:
    def run(env: DistEnv) -> None:
        cfg = fp16_config()
        built = _fresh(cfg, env)
        train(built, env, cfg, first=0, num=2)  # nonzero Adagrad and Adam state
        before = snapshot(built)
        scale = built.optimizer.loss_scale
        if overflow == "absurd_scale":
            scale.scaler.update(new_scale=ABSURD_SCALE)
        else:
            poison_table_grads(built, rank=0)
        start = scale.get_scale()
        losses = train(built, env, cfg, first=2, num=1)
        assert 0.5 < losses[0] < 1.0  # the output's loss is the unscaled one
        assert_close(snapshot(built), before, rtol=0, atol=0)
        assert scale.get_scale() == start / 2
        assert float(scale.found_inf) == 0.0  # cleared for the next step

    _single_rank(run)


def _sharded_worker(rank: int) -> None:
    env = init_distributed(device="cpu")
    try:
        results = {}
        for scale in (1.0, SCALE):
            cfg = fp16_config(mixed_plan=True, loss_scale=scale)
            built = _fresh(cfg, env)
            results[scale] = train(built, env, cfg, first=0, num=NUM_STEPS), snapshot(built)
        assert results[SCALE][0] == pytest.approx(results[1.0][0], abs=1e-3)
        assert_close(results[SCALE][1], results[1.0][1], rtol=1e-2, atol=5e-4)

        cfg = fp16_config(mixed_plan=True)
        built = _fresh(cfg, env)
        train(built, env, cfg, first=0, num=2)
        before = snapshot(built)
        poison_table_grads(built, rank=rank, on_rank=0)
        train(built, env, cfg, first=2, num=1)
        assert_close(snapshot(built), before, rtol=0, atol=0)  # rank 1 skipped too
        assert built.optimizer.loss_scale.get_scale() == SCALE / 2
    finally:
        destroy_distributed()


@pytest.mark.slow  # 2 ranks, about 1.5 minutes; the one-process loss-scaling tests stay
@pytest.mark.dist
def test_two_ranks_unscale_once_and_skip_together() -> None:
    run_ranks(_sharded_worker, world_size=2)
