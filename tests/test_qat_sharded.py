"""QAT on sharded tables equals an unsharded straight-through reference.

Two gloo ranks build the tiny DLRM of the sharding equivalence test through the
trainer's build path, turn on QAT with ``enable_embedding_qat`` after sharding,
train 5 steps through the train pipeline, then evaluate one batch in eval mode.
One process trains the same model from the same weights with every QAT table's
forward replaced by ``fake_quantize_ste`` of the whole table (the rows the
serving model holds, gradients straight through). Losses, the eval loss and
every master row must agree. The reference scales table gradients by the world
size for the reason given in tests/test_sharding_equivalence.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression import enable_embedding_qat
from compression.fake_quant import fake_quantize_ste
from sharding import destroy_distributed, init_distributed
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.test_sharding_equivalence import tiny_config
from trainer.build import build, build_unsharded
from trainer.config import Config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.pipeline import drain

WORLD_SIZE = 2
NUM_STEPS = 5
# As in the equivalence test (float32, other reduction orders), and measured
# here: losses agree to ~1e-7 and rows to ~1e-7. Quantization does not widen
# this because no row's codes flip between the two runs; a flip would move one
# element by a whole step (~1e-3 at int4) and fail loudly.
LOSS_ATOL = 1e-5
ROW_ATOL = 5e-5
# t_cat_2 stays fp32: tables missing from the dict are left alone.
MIXED_BITS = {"t_cat_0": 4, "t_cat_1": 8, "t_cat_3": 4}


def _worker(rank: int, strategy: str, bits: int | dict[str, int], init: str, out: str) -> None:
    cfg = tiny_config(strategy)
    batch_size = cfg.trainer.batch_size
    env = init_distributed(device="cpu")
    try:
        built = build(cfg, env)
        load_unsharded(built.model, torch.load(init))
        qat = enable_embedding_qat(built.model, bits=bits)
        pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
        source = SyntheticCriteo(cfg.data)

        def mean_losses(num_batches: int, first_batch: int) -> list[float]:
            batches = rank_batches(
                source,
                "train",
                batch_size=batch_size,
                rank=rank,
                world_size=env.world_size,
                num_batches=num_batches,
                first_batch=first_batch,
            )
            losses = []
            for loss, _logits, _labels in drain(pipeline, batches):
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                losses.append(float(loss) / env.world_size)
            return losses

        losses = mean_losses(NUM_STEPS, 0)
        built.model.eval()  # forward only; the hooks still quantize
        eval_loss = mean_losses(1, NUM_STEPS)[0]
        torch.save(
            {
                "losses": losses,
                "eval_loss": eval_loss,
                "bits": qat.bits,
                "shards": local_shards(built.model),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


class _StraightThrough(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(weight, self.bits)


def _reference(
    cfg: Config, init: dict, bits: dict[str, int]
) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    model = build_unsharded(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    bags = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    for table, b in bits.items():
        parametrize.register_parametrization(bags[table], "weight", _StraightThrough(b))
    tables = list(model.model.sparse_arch.parameters())  # the fp32 masters
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    table_opt = RowWiseAdagrad(tables, lr=cfg.optim.embedding_lr, eps=cfg.optim.embedding_eps)
    dense_opt = torch.optim.Adam(dense, lr=cfg.optim.dense_lr)
    source = SyntheticCriteo(cfg.data)
    global_batch = cfg.trainer.batch_size * WORLD_SIZE
    losses = []
    for step in range(NUM_STEPS):
        loss, _ = model(source.batch("train", step * global_batch, global_batch))
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        for p in tables:
            p.grad *= WORLD_SIZE
        table_opt.step()
        dense_opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        eval_loss, _ = model(source.batch("train", NUM_STEPS * global_batch, global_batch))
    for table in bits:
        parametrize.remove_parametrizations(bags[table], "weight", leave_parametrized=False)
    rows = {k: v for k, v in model.state_dict().items() if "embedding_bags" in k}
    return losses, float(eval_loss), rows


@pytest.mark.dist
@pytest.mark.parametrize(
    ("strategy", "bits"),
    [("table_wise", 8), ("row_wise", 8), ("row_wise", MIXED_BITS)],
    ids=["table_wise-int8", "row_wise-int8", "row_wise-int4-int8-fp32"],
)
def test_qat_sharded_matches_straight_through_reference(
    strategy: str, bits: int | dict[str, int], tmp_path: Path
) -> None:
    cfg = tiny_config(strategy)
    torch.manual_seed(0)
    init = build_unsharded(cfg, device=torch.device("cpu")).state_dict()
    init_path = tmp_path / "init.pt"
    torch.save(init, init_path)
    bits_by_table = (
        bits
        if isinstance(bits, dict)
        else {k.split(".")[-2]: bits for k in init if "embedding_bags" in k}
    )

    run_ranks(_worker, strategy, bits, str(init_path), str(tmp_path), world_size=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    ref_losses, ref_eval, ref_rows = _reference(cfg, init, bits_by_table)
    fp32_losses, _, _ = _reference(cfg, init, {})

    assert ranks[0]["bits"] == bits_by_table
    # The reference means something only if quantization changed the forward and
    # training moved (int8 moves the loss less, but not by nothing).
    step0_shift = abs(ref_losses[0] - fp32_losses[0])
    assert step0_shift > (1e-4 if 4 in bits_by_table.values() else 1e-7), step0_shift
    assert max(ref_losses) - min(ref_losses) > 1e-3
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=LOSS_ATOL, rtol=0
    )
    assert abs(ranks[0]["eval_loss"] - ref_eval) <= LOSS_ATOL
    for key, ref in ref_rows.items():
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        assert not torch.isnan(full).any(), f"{key}: shards do not cover the table"
        assert not torch.equal(ref, init[key]), f"{key}: reference rows never moved"
        torch.testing.assert_close(full, ref, atol=ROW_ATOL, rtol=0, msg=key)


def _column_wise_worker(rank: int) -> None:
    env = init_distributed(device="cpu")
    try:
        built = build(tiny_config("column_wise"), env)
        with pytest.raises(NotImplementedError, match="column_wise"):
            enable_embedding_qat(built.model, bits=8)
        # A table left out of the bits is not refused.
        enable_embedding_qat(built.model, bits={}).remove()
    finally:
        destroy_distributed()


@pytest.mark.dist
def test_column_wise_is_refused_on_every_rank() -> None:
    run_ranks(_column_wise_worker, world_size=WORLD_SIZE)
