"""Low-rank dense layers (compression/lowrank_dense.py): the factorized form, the SVD
swap, 2 gloo ranks against an unsharded reference, resume after the swap, export parity.

The sharded test trains the tiny DLRM of the sharding equivalence test through the
trainer's build path (table-wise, 2 ranks) for 5 steps with the SVD swap at step
2, and with factors from the start; one process trains the same model from the
same weights on the global batches, with its own converter doing the swap on its
plain Adam. Losses and every dense tensor must agree (float noise of other
reduction orders only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression.lowrank_allocate import allocate_ranks, max_saving_rank
from compression.lowrank_dense import LowRankDense
from compression.lowrank_layers import (
    LowRankLinear,
    SvdLowRankLinear,
    dense_report,
    energy_rank,
    factorize_dense,
)
from sharding import destroy_distributed, init_distributed
from sharding.state import load_unsharded
from tests.distributed import run_ranks
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import BATCH_SIZE, tiny_config
from trainer.builder.compression import lowrank_dense
from trainer.config.schema import Config, ConfigError, to_config
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain, make_pipeline
from trainer.session import build

NUM_STEPS = 5
SWAP_STEP = 2
LOSS_ATOL = 1e-5
DENSE_ATOL = 1e-4
CASES = {
    "svd": {"mode": "svd", "fraction": 0.25, "start_step": SWAP_STEP},
    "svd_energy": {"mode": "svd", "energy": 0.9, "start_step": SWAP_STEP},
    "from_start": {"mode": "from_start", "rank": 2},
    "svd_global": {"mode": "svd", "fraction": 0.5, "allocate": "global", "start_step": SWAP_STEP},
}


def _config(case: str) -> Config:
    cfg = tiny_config("table_wise")
    for key, value in CASES[case].items():
        setattr(cfg.lowrank_dense, key, value)
    return cfg


# --- the form ---------------------------------------------------------------------------


def test_rank_and_fraction_set_shapes_and_param_counts() -> None:
    model = unsharded_model(tiny_config("table_wise"), device=torch.device("meta"))
    # Layers [4 -> 16], [16 -> 8] (dense arch), [18 -> 16] (over), [16 -> 1] (logit).
    ranks = factorize_dense(model, mode="from_start", rank=2)
    assert list(ranks.values()) == [2, 2, 2]  # the logit layer would not shrink
    linears = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert [(m.down.weight.shape, m.up.weight.shape) for m in linears] == [
        ((2, 4), (16, 2)),
        ((2, 16), (8, 2)),
        ((2, 18), (16, 2)),
    ]
    report = dense_report(model)
    # 2 * (4 + 16) + 2 * (16 + 8) + 2 * (18 + 16) + biases 16 + 8 + 16, and the dense 16 + 1.
    assert report["dense_params"] == 40 + 48 + 68 + 40 + 17
    assert report["full_rank_dense_params"] == (64 + 16) + (128 + 8) + (288 + 16) + 17
    by_fraction = unsharded_model(tiny_config("table_wise"), device=torch.device("meta"))
    # floor(0.25 * in * out / (in + out)), at least 1: 0.8 -> 1, 1.33 -> 1, 2.1 -> 2.
    assert list(factorize_dense(by_fraction, mode="svd", fraction=0.25).values()) == [1, 1, 2]
    assert factorize_dense(by_fraction, mode="svd", fraction=0.25) == {}  # already done


def test_ranks_per_layer_on_the_default_dlrm_keep_a_quarter(compose_cfg) -> None:
    overrides = ["lowrank_dense.mode=from_start", "lowrank_dense.ranks=[0,0,9,8,0]"]
    cfg = to_config(compose_cfg(overrides))
    validate(cfg, world_size=1)
    d = cfg.lowrank_dense
    model = LowRankDense(mode=str(d.mode), ranks=tuple(d.ranks)).wrap_model(
        unsharded_model(cfg, device=torch.device("meta"))
    )
    report = dense_report(model)
    # [13 -> 64], [64 -> 16] dense; [367 -> 64] rank 9, [64 -> 32] rank 8; the logit dense.
    assert list(report["ranks"].values()) == [9, 8]
    assert report["full_rank_dense_params"] == 27_601
    assert report["dense_params"] == 896 + 1040 + 9 * 431 + 64 + 8 * 96 + 32 + 33 == 6712
    assert report["dense_params_fraction"] <= 0.25


def test_energy_keeps_the_fewest_singular_values_reaching_the_share() -> None:
    torch.manual_seed(0)
    p, _ = torch.linalg.qr(torch.randn(6, 6))
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1])  # squares: 16, 4, 1, 0.25, 0.01 (21.26)
    weight = p[:, :5] @ torch.diag(s) @ q.T
    assert energy_rank(weight, 0.75) == 1  # 16 / 21.26 = 0.753
    assert energy_rank(weight, 0.9) == 2  # 20 / 21.26 = 0.941
    assert energy_rank(weight, 0.99) == 4
    assert energy_rank(weight, 1.0) == 5
    layer = SvdLowRankLinear(5, 6, capacity=5)
    with torch.no_grad():
        layer.full.weight.copy_(weight)
    assert layer.factorize(energy=0.9) == 2
    assert layer.kept_rank == 2 and isinstance(layer.served(), LowRankLinear)
    assert layer.served().rank == 2


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_svd_swap_reproduces_the_layer_within_the_truncation_error(rank: int) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(7, 5)
    layer = SvdLowRankLinear(7, 5, capacity=rank)
    with torch.no_grad():
        layer.full.load_state_dict(dense.state_dict())
        layer.low.up.weight.normal_()  # whatever the factors held is overwritten
    x = torch.randn(32, 7)
    assert torch.equal(layer(x), dense(x))  # before the swap: the dense layer exactly
    assert layer.factorize(rank=rank) == rank
    s = torch.linalg.svdvals(dense.weight.detach())
    w_k = (layer.low.up.weight @ layer.low.down.weight).detach()
    error = float((w_k - dense.weight).detach().norm())
    assert error == pytest.approx(float(s[rank:].norm()), abs=1e-5)  # Eckart-Young
    if rank == 5:  # full rank: the same layer
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)
    else:
        assert (layer(x) - dense(x)).abs().max() > 1e-3
    expected = x @ w_k.T + dense.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.served()(x), layer(x), atol=1e-6, rtol=0)


DLRM_SHAPES = [(13, 64, True), (64, 16, True), (367, 64, True), (64, 32, True), (32, 1, True)]


def _served(shapes: list[tuple[int, int, bool]], ranks: list[int]) -> int:
    return sum(
        (o if b else 0) + (r * (i + o) if r else i * o) for (i, o, b), r in zip(shapes, ranks)
    )


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_global_allocation_fits_the_budget_and_fills_small_layers_first(fraction: float) -> None:
    full = _served(DLRM_SHAPES, [0] * len(DLRM_SHAPES))
    ranks = allocate_ranks(DLRM_SHAPES, fraction=fraction)
    assert ranks[-1] == 0  # the logit layer: no rank saves, stays dense
    assert all(0 < r <= max_saving_rank(i, o) for (i, o, _), r in zip(DLRM_SHAPES[:-1], ranks))
    served = _served(DLRM_SHAPES, ranks)
    assert served <= fraction * full
    assert served + 431 > fraction * full  # no room left for one more component
    if fraction == 0.25:  # flat spectra: the small layers fill up, the rest to [367 -> 64]
        assert ranks == [10, 12, 6, 21, 0]


def test_global_allocation_follows_the_spectra() -> None:
    shapes = [(32, 32, False), (32, 32, False)]
    steep = torch.tensor([10.0] * 4 + [0.1] * 28)  # 4 components hold ~all the energy
    flat = torch.ones(32)
    # 0.375 of 2048 weights: 12 components of 64 weights; the steep layer stops at its 4.
    ranks = allocate_ranks(shapes, fraction=0.375, spectra=[steep, flat])
    assert ranks == [4, 8] and _served(shapes, ranks) == 0.375 * 2 * 32 * 32
    assert allocate_ranks(shapes, fraction=0.375, spectra=[flat, steep]) == [8, 4]
    with pytest.raises(ValueError, match="lowrank_dense.fraction"):
        allocate_ranks(shapes, fraction=0.02)


def test_bad_settings_name_the_key(compose_cfg) -> None:
    cases = [
        (["lowrank_dense.mode=svd"], "lowrank_dense.rank"),
        (["lowrank_dense.mode=from_start", "lowrank_dense.energy=0.9"], "lowrank_dense.energy"),
        (["lowrank_dense.mode=svd", "lowrank_dense.fraction=1.5"], "lowrank_dense.fraction"),
        (
            ["lowrank_dense.mode=svd", "lowrank_dense.rank=4", "lowrank_dense.start_step=99999"],
            "lowrank_dense.start_step",
        ),
        (["lowrank_dense.mode=from_start", "lowrank_dense.rank=4", "model=deepfm"], "model.arch"),
        (["lowrank_dense.mode=from_start", "lowrank_dense.ranks=[1,2]"], "lowrank_dense.ranks"),
        (
            ["lowrank_dense.mode=svd", "lowrank_dense.rank=4", "lowrank_dense.allocate=global"],
            "lowrank_dense.allocate",
        ),
    ]
    for overrides, key in cases:
        cfg = to_config(compose_cfg(["trainer=smoke", *overrides]))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(cfg, world_size=1)


# --- 2 gloo ranks against one process ------------------------------------------------------


def _sharded_worker(rank: int, out_dir: str) -> None:
    env = init_distributed(device="cpu")
    try:
        for case in CASES:
            cfg = _config(case)
            built = build(cfg, env)
            load_unsharded(built.model, torch.load(Path(out_dir) / f"{case}-init.pt"))
            pipeline = make_pipeline(
                "sparse_dist",
                built.model,
                built.optimizer,
                env.device,
                model_fwd=built.converters.wrap_forward(built.model),
            )
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
            dense = {
                k: v.detach().clone()
                for k, v in built.model.state_dict().items()
                if "_arch" in k and "embedding_bags" not in k and type(v) is torch.Tensor
            }
            torch.save({"losses": losses, "dense": dense}, Path(out_dir) / f"{case}-rank{rank}.pt")
    finally:
        destroy_distributed()


def _reference(cfg: Config, init: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unsharded model through the same converter: the swap on its own plain Adam."""
    lowrank = lowrank_dense(cfg)  # the converter the run builds
    model = lowrank.wrap_model(unsharded_model(cfg, device=torch.device("cpu")))
    model.load_state_dict(init)
    tables = list(model.model.sparse_arch.embedding_bag_collection.parameters())
    table_ids = {id(p) for p in tables}
    dense = torch.optim.Adam(
        [p for p in model.parameters() if id(p) not in table_ids], lr=cfg.optim.dense_lr
    )
    table_opt = RowWiseAdagrad(tables, lr=cfg.optim.embedding_lr, eps=cfg.optim.embedding_eps)
    lowrank.convert_sharded(model, device=torch.device("cpu"), process_group=None)
    lowrank.wrap_optimizer(model, dense, device=torch.device("cpu"), process_group=None)
    forward = lowrank.wrap_forward(model)
    source, global_batch, losses = SyntheticCriteo(cfg.data), BATCH_SIZE * 2, []
    for step in range(NUM_STEPS):
        loss, _ = forward(source.batch("train", step * global_batch, global_batch))
        dense.zero_grad()
        table_opt.zero_grad()
        loss.backward()
        for p in tables:  # torchrec sums the ranks' table gradients (test_sharding_equivalence)
            p.grad *= 2
        dense.step()
        table_opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("lowrank2")
    for case in CASES:
        torch.manual_seed(0)
        model = unsharded_model(_config(case), device=torch.device("cpu"))
        LowRankDense(**CASES[case]).wrap_model(model)
        torch.save(model.state_dict(), out_dir / f"{case}-init.pt")
    run_ranks(_sharded_worker, str(out_dir), world_size=2)
    return out_dir


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_the_unsharded_reference(two_ranks: Path, case: str) -> None:
    init = torch.load(two_ranks / f"{case}-init.pt")
    ranks = [torch.load(two_ranks / f"{case}-rank{r}.pt") for r in range(2)]
    ref_losses, ref_state = _reference(_config(case), init)
    assert max(ref_losses) - min(ref_losses) > 1e-3  # training moved
    for r in ranks:
        assert r["losses"] == pytest.approx(ref_losses, abs=LOSS_ATOL)
    assert ranks[0]["dense"].keys() and ranks[0]["dense"].keys() == ranks[1]["dense"].keys()
    for key, value in ranks[0]["dense"].items():
        assert torch.equal(value, ranks[1]["dense"][key]), key  # replicas stay identical
        ref_key = key.removeprefix("module.")
        torch.testing.assert_close(value, ref_state[ref_key], atol=DENSE_ATOL, rtol=0)
    factorized = [v for k, v in ranks[0]["dense"].items() if k.endswith(".factorized")]
    if CASES[case]["mode"] == "svd":  # the swap happened, the dense weights moved on
        assert factorized and all(float(f) == 1.0 for f in factorized)
    else:
        assert not factorized


# --- resume after the swap, export parity under QAT ------------------------------------------

RUN = [
    "trainer=smoke",
    "trainer.num_steps=8",
    "trainer.eval_every_steps=8",
    "trainer.batch_size=64",
    "trainer.eval_batch_size=512",
    "trainer.progress_bar=false",
    "trainer.plot=false",
    "trainer.checkpoint_every_steps=4",
    "trainer.async_checkpoint=false",
    "data.num_eval_samples=1024",
    "data.cardinalities=[40,100,7,64]",
    "data.num_dense=4",
    "data.num_interactions=3",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,1]",
    "lowrank_dense.mode=svd",
    "lowrank_dense.fraction=0.25",
    f"lowrank_dense.start_step={SWAP_STEP}",
    "qat=int8",
    "qat.dense_bits=8",
]


def test_resume_after_the_swap_and_export_parity_under_qat(compose_cfg, tmp_path: Path) -> None:
    from trainer.train import train  # in this process: a world of one

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    a = train(to_config(compose_cfg([*RUN, "trainer.export=true"])), run_dir=run_a)
    export = a["export"]
    # The served program holds the factors the trained eval used: QAT parity.
    assert export["max_abs_logit_diff"] <= 1e-5
    assert export["lowrank_dense"]["ranks"] and export["dense_bits"] == 8
    assert (
        export["lowrank_dense"]["dense_params"]
        < export["lowrank_dense"]["full_rank_dense_params"] / 2
    )
    # Resumed at step 4, after the swap at 2: the factorized layers come back from the
    # checkpoint (the swap is not redone) and the run ends where the unbroken one did.
    resume = f"trainer.resume={run_a / 'checkpoints' / 'step_4'}"
    b = train(to_config(compose_cfg([*RUN, resume])), run_dir=run_b)
    assert b["logloss"] == pytest.approx(a["logloss"], abs=1e-7)
    assert b["auc"] == pytest.approx(a["auc"], abs=1e-7)
    assert b["lowrank_dense"]["ranks"] == a["lowrank_dense"]["ranks"]
    summary = json.loads((run_b / "summary.json").read_text())
    assert summary["lowrank_dense"]["dense_params_fraction"] < 0.5


@pytest.mark.parametrize("mode", ["from_start", "svd"])
def test_global_fraction_below_rank_one_is_a_config_error(
    compose_cfg, tmp_path: Path, mode: str
) -> None:
    """Too small a fraction stops the build (svd: not at the swap) with a ConfigError."""
    from trainer.train import train  # in this process: a world of one

    overrides = [o for o in RUN if not o.startswith(("lowrank_dense.", "qat"))]
    overrides += [f"lowrank_dense.mode={mode}", "lowrank_dense.fraction=0.05"]
    overrides += ["lowrank_dense.allocate=global"]
    with pytest.raises(ConfigError, match=r"lowrank_dense\.fraction=0\.05 .* at least 0\.\d+"):
        train(to_config(compose_cfg(overrides)), run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # stopped before a step
