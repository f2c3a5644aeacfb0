"""QAT on sharded tables equals an unsharded straight-through reference, step by step.

Two gloo ranks build the tiny DLRM of the sharding equivalence test through the
trainer's build path (table-wise, row-wise, data-parallel, column-wise; int8, int4, and a
per-table mix with one table left fp32), turn on QAT with
``enable_embedding_qat`` after sharding, train 5 steps through the train
pipeline (saving their table shards after each step), then evaluate one batch
in eval mode. One process trains the same model from the same weights with
every QAT table's forward replaced by ``fake_quantize_ste`` of the whole table
(the rows the serving model holds, gradients straight through). The reference
scales table gradients by the world size for the reason given in
tests/test_sharding_equivalence.py.

Why the reference is teacher-forced: before each step (and the eval forward) it
loads the sharded run's master rows from the end of the previous step.
Quantization is discontinuous: the float noise between the two runs' rows
(other reduction orders, up to ~2e-5 after Adagrad) flips an int8 code now and
then, which moves that element by a whole step (~1e-3) and the runs apart from
there (free-running, measured: losses up to 1.7e-5 apart by step 5, rows up to
3.6e-4). Re-syncing the rows each step checks what QAT claims, state -> next
state, at float precision: the pooled embeddings of the quantized rows, the
loss, and the update of the restored master rows. Dense weights are not
re-synced; they drift only by continuous float noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import SparseArch

from compression import enable_embedding_qat
from compression.fake_quant import fake_quantize_ste
from sharding import DistEnv, destroy_distributed, init_distributed
from sharding.planner import sharding_type
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import (
    block_width,
    reference_optimizers,
    reference_step,
    table_parameters,
    unsharded_model,
)
from tests.test_sharding_equivalence import tiny_config
from trainer.config.schema import Config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.session import build

NUM_STEPS = 5
# Float32 with other reduction orders, as in the equivalence test; row-wise
# Adagrad amplifies the noise in rows. Measured (teacher-forced, see above):
# pooled embeddings equal bit for bit, losses within 6e-8, rows within 1.8e-5
# (5.3e-5 for one element with table_column_wise), as in the equivalence test.
POOLED_ATOL = 1e-6
LOSS_ATOL = 1e-6
ROW_ATOL = 1e-4
# QAT must move the step-0 pooled embeddings by about a quantization step;
# measured: 1.1e-3 with int8 everywhere, 9.8e-3 with the int4/int8 mix, 1.8e-2 int4.
MIN_QAT_SHIFT = 1e-4
# t_cat_2 stays fp32: tables missing from the dict are left alone.
MIXED_BITS = {"t_cat_0": 4, "t_cat_1": 8, "t_cat_3": 4}
# int2 with fitted row ranges (compression/row_range.py) on some tables.
INT2_BITS = {"t_cat_0": 2, "t_cat_1": 4, "t_cat_3": 2}
# (id, strategy, bits, row range): all run in one pair of processes (starting one
# costs ~10 s).
CASES = [
    ("table_wise-int8", "table_wise", 8, "minmax"),
    ("row_wise-int4-int8-fp32", "row_wise", MIXED_BITS, "minmax"),
    ("data_parallel-int4", "data_parallel", 4, "minmax"),  # the dense kernel, DDP-wrapped
    # Each rank holds half of every row's columns: the rows' min/max is all-reduced.
    ("column_wise-int4-int8-fp32", "column_wise", MIXED_BITS, "minmax"),
    ("row_wise-int2-int4-fp32-mse", "row_wise", INT2_BITS, "mse"),
    # The fitted range's per-row sums are all-reduced as well.
    ("column_wise-int2-int4-fp32-mse", "column_wise", INT2_BITS, "mse"),
]
# Four ranks as two hosts of two: column blocks on one host, or (grid) each
# column block row-split over a host's ranks, so rows are all-reduced per row block.
CASES_4 = [
    ("table_column_wise-int8", "table_column_wise", 8, "minmax"),
    ("grid-int4-int8-fp32", "grid", MIXED_BITS, "minmax"),
    ("grid-int2-int4-fp32-mse", "grid", INT2_BITS, "mse"),
]
WORLD_SIZES = {**{c[0]: 2 for c in CASES}, **{c[0]: 4 for c in CASES_4}}


def _train_case(
    rank: int, env: DistEnv, strategy: str, bits: int | dict[str, int], row_range: str, init: dict
) -> dict[str, Any]:
    cfg = tiny_config(strategy)
    built = build(cfg, env)
    load_unsharded(built.model, init)
    qat = enable_embedding_qat(built.model, bits=bits, row_range=row_range)
    pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
    source = SyntheticCriteo(cfg.data)
    sparse_arch = next(m for m in built.model.modules() if isinstance(m, SparseArch))
    pooled = _record_output(sparse_arch)

    def mean_loss(step: int) -> float:
        batches = rank_batches(
            source,
            "train",
            batch_size=cfg.trainer.batch_size,
            rank=rank,
            world_size=env.world_size,
            num_batches=1,
            first_batch=step,
        )
        ((loss, _logits, _labels),) = drain(pipeline, batches)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return float(loss) / env.world_size

    losses, snapshots = [], []
    for step in range(NUM_STEPS):
        losses.append(mean_loss(step))
        snapshots.append(_table_pieces(built.model))  # after this step's table update
    built.model.eval()  # forward only; the hooks still quantize
    return {
        "losses": losses,
        "eval_loss": mean_loss(NUM_STEPS),
        "pooled": pooled,
        "bits": qat.bits,
        "local_tables": qat.local_tables,
        "snapshots": snapshots,
    }


def _table_pieces(model: nn.Module) -> dict[str, list[tuple]]:
    """``local_shards``, plus data-parallel tables (plain replicated tensors)."""
    replicated = {
        k: [((0, 0), v.detach().clone())]
        for k, v in model.state_dict().items()
        if "embedding_bags" in k and type(v) is torch.Tensor
    }
    return {**replicated, **local_shards(model)}


def _worker(rank: int, init_path: str, out: str, cases: list[tuple]) -> None:
    env = init_distributed(device="cpu")
    try:
        init = torch.load(init_path)
        results = {
            case: _train_case(rank, env, strategy, bits, row_range, init)
            for case, strategy, bits, row_range in cases
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        destroy_distributed()


class _StraightThrough(nn.Module):
    def __init__(self, bits: int, row_range: str) -> None:
        super().__init__()
        self.bits = bits
        self.row_range = row_range

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(weight, self.bits, row_range=self.row_range)


Tables = dict[str, torch.Tensor]  # table name -> full (unsharded) rows


def _record_output(module: nn.Module) -> list[torch.Tensor]:
    """Each forward's output: SparseArch's is the (batch, features, dim) pooled embeddings."""
    outputs: list[torch.Tensor] = []

    def record(_m: nn.Module, _args: Any, out: Any) -> None:
        # The train pipeline traces the model with torch.fx once: skip its proxies.
        if isinstance(out, torch.Tensor):
            outputs.append(out.detach().clone())

    module.register_forward_hook(record)
    return outputs


def _reference(
    cfg: Config,
    init: dict,
    bits: dict[str, int],
    starts: list[Tables] | None = None,
    *,
    world_size: int,
    row_range: str = "minmax",
) -> dict[str, Any]:
    """Losses, eval loss, pooled embeddings per forward, rows after each step.

    ``starts``: the rows to load before each step and before the eval forward.
    """
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    pooled = _record_output(model.model.sparse_arch)
    bags = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    # The fp32 master rows: each table's weight, or its column blocks when the
    # shards split columns (one Adagrad accumulator per block, tests/reference.py).
    width = block_width(sharding_type(cfg.sharding.strategy), cfg.sharding.column_shard_dim)
    masters = {name: table_parameters(bag, width=width) for name, bag in bags.items()}
    for table, b in bits.items():  # on top: sees whole (concatenated) rows
        parametrize.register_parametrization(bags[table], "weight", _StraightThrough(b, row_range))
    # Data-parallel tables are replicated dense parameters in torchrec: DDP averages
    # their gradients and the dense optimizer (not the fused one) updates them.
    data_parallel = cfg.sharding.strategy == "data_parallel"
    tables = [] if data_parallel else [p for parts in masters.values() for p in parts]
    optimizers = reference_optimizers(model, tables, cfg.optim)
    source = SyntheticCriteo(cfg.data)
    global_batch = cfg.trainer.batch_size * world_size

    def load(rows: Tables) -> None:
        with torch.no_grad():
            for name, parts in masters.items():
                widths = [p.shape[1] for p in parts]
                for p, block in zip(parts, rows[name].split(widths, dim=1)):
                    p.copy_(block)

    losses, after = [], []
    for step in range(NUM_STEPS):
        if starts is not None:
            load(starts[step])
        batch = source.batch("train", step * global_batch, global_batch)
        losses.append(reference_step(model, batch, optimizers))
        after.append({name: torch.cat(parts, dim=1).detach() for name, parts in masters.items()})
    if starts is not None:
        load(starts[NUM_STEPS])
    with torch.no_grad():
        eval_loss, _ = model(source.batch("train", NUM_STEPS * global_batch, global_batch))
    return {"losses": losses, "eval_loss": float(eval_loss), "pooled": pooled, "after": after}


def _table_name(key: str) -> str:
    return key.split(".")[-2]  # "...embedding_bags.t_cat_0.weight"


def _run(out: Path, cases: list[tuple], world_size: int) -> tuple[dict, list[dict]]:
    """The initial weights, and each rank's results for every case."""
    torch.manual_seed(0)
    init = unsharded_model(tiny_config("table_wise"), device=torch.device("cpu")).state_dict()
    torch.save(init, out / "init.pt")
    run_ranks(
        _worker,
        str(out / "init.pt"),
        str(out),
        cases,
        world_size=world_size,
        local_world_size=2,
    )
    return init, [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    return _run(tmp_path_factory.mktemp("qat"), CASES, world_size=2)


@pytest.fixture(scope="module")
def runs_two_hosts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    return _run(tmp_path_factory.mktemp("qat4"), CASES_4, world_size=4)


@pytest.mark.dist
@pytest.mark.parametrize(
    ("case", "strategy", "bits", "row_range"),
    CASES + CASES_4,
    ids=[c[0] for c in CASES + CASES_4],
)
def test_qat_sharded_matches_straight_through_reference(
    request: pytest.FixtureRequest,
    case: str,
    strategy: str,
    bits: int | dict[str, int],
    row_range: str,
) -> None:
    world_size = WORLD_SIZES[case]
    runs = request.getfixturevalue("runs" if world_size == 2 else "runs_two_hosts")
    init, rank_results = runs
    ranks = [r[case] for r in rank_results]
    cfg = tiny_config(strategy)
    keys = {_table_name(k): k for k in init if "embedding_bags" in k}
    shapes = {t: tuple(init[k].shape) for t, k in keys.items()}
    bits_by_table = bits if isinstance(bits, dict) else dict.fromkeys(keys, bits)
    sharded: list[Tables] = [
        {t: assemble([r["snapshots"][step][k] for r in ranks], shapes[t]) for t, k in keys.items()}
        for step in range(NUM_STEPS)
    ]
    init_tables = {t: init[k] for t, k in keys.items()}
    ref = _reference(
        cfg,
        init,
        bits_by_table,
        starts=[init_tables, *sharded],
        world_size=world_size,
        row_range=row_range,
    )
    fp32 = _reference(cfg, init, {}, world_size=world_size)
    # Per forward (5 steps, then eval): the global batch's pooled embeddings.
    pooled = [torch.cat(p) for p in zip(*(r["pooled"] for r in ranks))]

    assert ranks[0]["bits"] == bits_by_table
    # Every QAT table's shards were hooked somewhere (the kernels are easy to miss).
    assert {t for r in ranks for t in r["local_tables"]} == set(bits_by_table)
    # The comparison means something only if quantization changed the forward
    # (by about a quantization step, far above float noise) and training moved.
    assert len(pooled) == len(ref["pooled"]) == NUM_STEPS + 1
    assert (ref["pooled"][0] - fp32["pooled"][0]).abs().max() > MIN_QAT_SHIFT
    assert max(ref["losses"]) - min(ref["losses"]) > 1e-3

    for got, want in zip(pooled, ref["pooled"]):  # the lookups, in train and eval mode
        torch.testing.assert_close(got, want, atol=POOLED_ATOL, rtol=0)
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), atol=LOSS_ATOL, rtol=0
    )
    assert abs(ranks[0]["eval_loss"] - ref["eval_loss"]) <= LOSS_ATOL
    for step in range(NUM_STEPS):
        for t, want in ref["after"][step].items():
            got = sharded[step][t]
            assert not torch.isnan(got).any(), f"{t}: shards do not cover the table"
            torch.testing.assert_close(
                got, want, atol=ROW_ATOL, rtol=0, msg=lambda m, t=t, s=step: f"{t} step {s}: {m}"
            )
    for t in keys:
        assert not torch.equal(sharded[-1][t], init_tables[t]), f"{t}: rows never moved"
