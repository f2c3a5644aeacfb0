"""Factorized tables (low-rank, quotient-remainder, mixed dims): shapes, sharded
training against an unsharded reference, QAT export parity, checkpoint resume.

* unit: the stored tables and their parameters, the derived QR ids;
* 2 gloo ranks train each form 5 steps through the trainer's build path and
  pipeline (row-wise, table-wise, column-wise) and must match one process training the
  same model from the same weights on the same global batches (the reference of
  tests/test_sharding_equivalence.py: its projections are dense parameters,
  trained by Adam like the MLPs; its stored tables by row-wise Adagrad);
* in one process, ``train`` with ``qat=int8`` and the export: the served bundle's
  logits equal the trained model's own QAT eval (its checkpointed rows fake-quantized,
  recomputed here without the export code) within 1e-5, and a run resumed from its
  step-4 checkpoint ends where the unbroken run ends.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.bundle import load_program
from compression.factorized import Factorized, FactorSpec
from compression.serving import fake_quantize_tables
from sharding import destroy_distributed, init_distributed
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import (
    block_width,
    reference_optimizers,
    reference_step,
    synthetic_tables,
    table_bags,
    table_parameters,
    unsharded_model,
)
from tests.test_sharding_equivalence import BATCH_SIZE, NUM_STEPS, tiny_config
from trainer.config.schema import Config, TableConfig, to_config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.session import build

# model settings per form (tiny_config: dim 8, tables of 40, 100, 7, 64 rows)
FORMS = {
    "lowrank": {"table_rank": 4},
    "qr_mul": {"qr_min_rows": 50},
    "qr_concat": {"qr_min_rows": 50, "qr_op": "concat", "table_rank": 4},
    "mixed": {"mixed_dims": 0.5},
    # Each form on its own tables (tests/test_factorized_hier.py): t_cat_0 low rank 4,
    # t_cat_1 QR concat (10 x 8 and 10 x 8, projected 16 -> 8), t_cat_2 (the smallest)
    # full, t_cat_3 mixed dims (8 * (7 / 64)^0.5 -> 4 wide).
    "each": {
        "mixed_dims": 0.5,
        "tables": [
            TableConfig(name="t_cat_0", num_embeddings=40, feature_names=["cat_0"], rank=4),
            TableConfig(
                name="t_cat_1",
                num_embeddings=100,
                feature_names=["cat_1"],
                rank=8,
                qr_buckets=10,
                qr_op="concat",
            ),
            TableConfig(name="t_cat_2", num_embeddings=7, feature_names=["cat_2"]),
            TableConfig(name="t_cat_3", num_embeddings=64, feature_names=["cat_3"]),
        ],
    },  # fmt: skip
    # DeepFM's field tables low rank, the two of >= 50 rows also QR; its wide tables plain.
    "deepfm_lowrank_qr": {"arch": "deepfm", "table_rank": 4, "qr_min_rows": 50},
    "wide_deep_qr_mixed": {"arch": "wide_deep", "qr_min_rows": 50, "mixed_dims": 0.5},
}
# (case, form, strategy); column_wise splits the dim-8 stored tables into 4-wide blocks.
CASES = [
    ("lowrank-row_wise", "lowrank", "row_wise"),
    ("lowrank-table_wise", "lowrank", "table_wise"),
    ("qr_mul-row_wise", "qr_mul", "row_wise"),
    ("qr_concat-table_wise", "qr_concat", "table_wise"),
    ("mixed-row_wise", "mixed", "row_wise"),
    ("mixed-column_wise", "mixed", "column_wise"),
    ("deepfm_lowrank_qr-row_wise", "deepfm_lowrank_qr", "row_wise"),
]
# The default tier runs one case per form (starting two ranks costs ~10 s; the machine
# is shared), the slow tier the rest.
DEFAULT_CASES = (
    "lowrank-row_wise", "qr_concat-table_wise", "mixed-row_wise", "deepfm_lowrank_qr-row_wise",
)  # fmt: skip
LOSS_ATOL = 1e-5  # as tests/test_sharding_equivalence.py (float sums in other orders)
ROW_ATOL = 1e-4


def _config(form: str, strategy: str = "table_wise") -> Config:
    cfg = tiny_config(strategy)
    for key, value in FORMS[form].items():
        setattr(cfg.model, key, copy.deepcopy(value))
    return cfg


def test_stored_tables_and_parameters() -> None:
    stored = {
        form: {
            t.name: (t.num_embeddings, t.embedding_dim)
            for t in synthetic_tables(_config(form)).trained
        }
        for form in FORMS
    }
    assert stored["lowrank"] == {
        "t_cat_0": (40, 4),
        "t_cat_1": (100, 4),
        "t_cat_2": (7, 4),
        "t_cat_3": (64, 4),
    }
    # ceil(sqrt(rows)) buckets for tables of >= 50 rows: 100 -> 10 x 10, 64 -> 8 x 8.
    assert stored["qr_mul"] == {
        "t_cat_0": (40, 8), "t_cat_1_q": (10, 8), "t_cat_1_r": (10, 8),
        "t_cat_2": (7, 8), "t_cat_3_q": (8, 8), "t_cat_3_r": (8, 8),
    }  # fmt: skip
    assert stored["each"] == {
        "t_cat_0": (40, 4), "t_cat_1_q": (10, 8), "t_cat_1_r": (10, 8),
        "t_cat_2": (7, 8), "t_cat_3": (64, 4),
    }  # fmt: skip
    # DeepFM / Wide&Deep: the field tables as stored, the wide ones plain (rows x 4).
    assert stored["deepfm_lowrank_qr"] == {
        "t_cat_0": (40, 4), "t_cat_1_q": (10, 4), "t_cat_1_r": (10, 4), "t_cat_2": (7, 4),
        "t_cat_3_q": (8, 4), "t_cat_3_r": (8, 4),
        "w_t_cat_0": (40, 4), "w_t_cat_1": (100, 4), "w_t_cat_2": (7, 4), "w_t_cat_3": (64, 4),
    }  # fmt: skip
    assert {k: v for k, v in stored["wide_deep_qr_mixed"].items() if k.startswith("w_")} == {
        "w_t_cat_0": (40, 4), "w_t_cat_1": (100, 4), "w_t_cat_2": (7, 4), "w_t_cat_3": (64, 4),
    }  # fmt: skip
    # dim * sqrt(7 / rows), rounded up to a multiple of 4: the smallest table keeps 8.
    assert {k: v[1] for k, v in stored["mixed"].items()} == {
        "t_cat_0": 4, "t_cat_1": 4, "t_cat_2": 8, "t_cat_3": 4,
    }  # fmt: skip

    def num_params(cfg: Config) -> int:
        return sum(p.numel() for p in unsharded_model(cfg, device=torch.device("cpu")).parameters())

    for form in FORMS:
        full = tiny_config("table_wise")  # the same architecture, unfactorized
        full.model.arch = FORMS[form].get("arch", full.model.arch)
        assert num_params(_config(form)) < num_params(full), form
        model = unsharded_model(_config(form), device=torch.device("cpu"))
        loss, (_, logits, _) = model(SyntheticCriteo(_config(form).data).batch("train", 0, 8))
        assert logits.shape == (8,) and torch.isfinite(loss)


def test_qr_ids_are_made_on_device_from_the_kjt() -> None:
    spec = FactorSpec("t_b", ["b"], rows=100, dim=8, qr_buckets=10)
    f = Factorized([FactorSpec("t_a", ["a"], rows=50, dim=8), spec])
    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([3, 7, 15, 42]), lengths=torch.tensor([1, 1, 1, 1])
    )
    out = f.split_kjt(kjt)
    assert out.keys() == ["a", "b_q", "a_r", "b_r"]
    assert out.values().tolist() == [3, 7, 1, 4, 0, 0, 5, 2]
    assert math.ceil(100 / 10) == spec.stored()[0].rows


def _worker(rank: int, init_dir: str, cases: list[tuple[str, str, str]]) -> None:
    env = init_distributed(device="cpu")
    try:
        for case, form, strategy in cases:
            cfg = _config(form, strategy)
            built = build(cfg, env)
            load_unsharded(built.model, torch.load(Path(init_dir) / f"{case}-init.pt"))
            pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
            batches = rank_batches(
                SyntheticCriteo(cfg.data), "train", batch_size=BATCH_SIZE, rank=rank,
                world_size=env.world_size, num_batches=NUM_STEPS,
            )  # fmt: skip
            losses = []
            for loss, _, _ in drain(pipeline, batches):
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                losses.append(float(loss) / env.world_size)
            plan = {
                t: (ps.sharding_type, list(ps.ranks or []))
                for m in built.plan.plan.values()
                for t, ps in m.items()
            }
            torch.save(
                {"losses": losses, "shards": local_shards(built.model), "plan": plan},
                Path(init_dir) / f"{case}-rank{rank}.pt",
            )
    finally:
        destroy_distributed()


def run_cases(
    out: Path,
    cases: list[tuple[str, str, str]],
    *,
    world_size: int = 2,
    local_world_size: int | None = None,
) -> Path:
    """Every ``(case, form, strategy)`` trained in one process group of ``world_size``
    ranks (``local_world_size`` per host), from an init saved here."""
    for case, form, strategy in cases:
        torch.manual_seed(0)
        init = unsharded_model(_config(form, strategy), device=torch.device("cpu")).state_dict()
        torch.save(init, out / f"{case}-init.pt")
    run_ranks(_worker, str(out), cases, world_size=world_size, local_world_size=local_world_size)
    return out


def _reference(
    cfg: Config, init: dict, world_size: int, plan: dict[str, tuple[str, list[int]]]
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process trains the model on the global batches (every collection's tables:
    a wide model's too; column-split ones per column block, tests/reference.py)."""
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    named = table_bags(model)
    width = cfg.sharding.column_shard_dim
    tables = [
        p
        for n, t in named.items()
        for p in table_parameters(t, width=block_width(plan[n][0], width))
    ]
    optimizers = reference_optimizers(model, tables, cfg.optim)
    source = SyntheticCriteo(cfg.data)
    size = BATCH_SIZE * world_size
    losses = [
        reference_step(model, source.batch("train", s * size, size), optimizers)
        for s in range(NUM_STEPS)
    ]
    rows = {k: named[k.split(".")[-2]].weight for k in init if "embedding_bags" in k}
    return losses, {k: w.detach().clone() for k, w in rows.items()}


def check_sharded(out: Path, case: str, form: str, strategy: str, *, world_size: int) -> dict:
    """The ranks' losses and assembled rows of ``case`` equal the unsharded reference's;
    returns the plan (table -> (sharding type, ranks))."""
    cfg = _config(form, strategy)
    init = torch.load(out / f"{case}-init.pt")
    ranks = [torch.load(out / f"{case}-rank{r}.pt") for r in range(world_size)]
    plan = ranks[0]["plan"]
    ref_losses, ref_tables = _reference(cfg, init, world_size, plan)
    assert max(ref_losses) - min(ref_losses) > 1e-3
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=LOSS_ATOL, rtol=0
    )
    assert set(ref_tables) == set(ranks[0]["shards"]), "a table was not compared"
    for key, ref in ref_tables.items():
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        assert not torch.isnan(full).any(), f"{key}: shards do not cover the table"
        assert not torch.equal(ref, init[key]), f"{key}: reference rows never moved"
        torch.testing.assert_close(
            full, ref, atol=ROW_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )
    return plan


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_cases(tmp_path_factory.mktemp("fz2"), [c for c in CASES if c[0] in DEFAULT_CASES])


@pytest.fixture(scope="module")
def two_ranks_slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = [c for c in CASES if c[0] not in DEFAULT_CASES]
    return run_cases(tmp_path_factory.mktemp("fz2s"), cases)


@pytest.mark.dist
@pytest.mark.parametrize(
    "case,form,strategy",
    [c if c[0] in DEFAULT_CASES else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_sharded_matches_unsharded(
    request: pytest.FixtureRequest, case: str, form: str, strategy: str
) -> None:
    fixture = "two_ranks" if case in DEFAULT_CASES else "two_ranks_slow"
    plan = check_sharded(request.getfixturevalue(fixture), case, form, strategy, world_size=2)
    assert {v[0] for v in plan.values()} == {strategy}
    if FORMS[form].get("arch") == "deepfm":  # the stored QR pairs and the plain wide tables
        assert {"t_cat_1_q", "t_cat_1_r", "w_t_cat_1", "w_t_cat_3"} <= set(plan), plan


TINY = [
    "trainer.batch_size=64", "trainer.num_steps=8", "trainer.eval_every_steps=8",
    "trainer.eval_batch_size=256", "data.cardinalities=[50,60,70,400]", "data.num_eval_samples=512",
    "model.embedding_dim=8", "model.dense_arch_layer_sizes=[16,8]",
    "trainer.progress_bar=false", "trainer.plot=false", "qat=int8",
    "trainer.checkpoint_every_steps=4", "trainer.async_checkpoint=false",
]  # fmt: skip
RUN_FORMS = {
    "lowrank": ["model.table_rank=4"],
    "qr_mul": ["model.qr_min_rows=300"],
    "mixed": ["model.mixed_dims=1.0"],
    # DeepFM: low rank 4 on every field table, the 400-row one also QR (m = 20); its
    # wide w_<table> tables stay plain.
    "deepfm_lowrank_qr": ["model=deepfm", "model.table_rank=4", "model.qr_min_rows=300"],
}


def _flat_checkpoint(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    flat = {}

    def walk(tree: dict, prefix: str) -> None:
        for k, v in tree.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(torch.load(out), "")
    return flat


@pytest.mark.parametrize(
    "form",
    [
        "lowrank",
        "deepfm_lowrank_qr",
        *(pytest.param(f, marks=pytest.mark.slow) for f in ("qr_mul", "mixed")),
    ],
)
def test_qat_export_parity_and_resume(form: str, compose_cfg, tmp_path: Path) -> None:
    from trainer.train import train  # in this process: a world of one

    overrides = [*TINY, *RUN_FORMS[form]]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    summary = train(to_config(compose_cfg([*overrides, "trainer.export=true"])), run_dir=run_a)
    export = summary["export"]
    assert {"auc", "bytes", "fp32_bytes"} <= set(export)
    assert export["max_abs_logit_diff"] <= 1e-5
    # Smaller than the unfactorized fp32 tables (580 rows x 8 floats); a 4-wide int8 row
    # is as big as a 4-wide fp32 one (fp16 scale/bias, 16-byte rows), so not by 4x here.
    assert export["table_bytes"] < 580 * 8 * 4
    # The trained model's own QAT eval, recomputed: checkpointed rows fake-quantized to int8.
    cfg = to_config(compose_cfg(overrides))
    state = _flat_checkpoint(run_a / "checkpoints" / "step_8", tmp_path)
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}, strict=True
    )
    bits = {t.name: 8 for t in synthetic_tables(cfg).trained}
    fake_quantize_tables(model, table_bits=bits)
    model.eval()
    program = load_program(run_a / export["path"] / "model.pt2")
    batch = SyntheticCriteo(cfg.data).batch("eval", 0, 256)
    with torch.no_grad():
        eager = model.model(batch.dense_features, batch.sparse_features).flatten()
        kjt = batch.sparse_features
        served = program(batch.dense_features, kjt.values().long(), kjt.lengths().long())
    assert (torch.logit(served.double()) - eager.double()).abs().max() <= 1e-5
    # Resumed from step 4: ends where the unbroken run ends.
    resume = f"trainer.resume={run_a / 'checkpoints' / 'step_4'}"
    train(to_config(compose_cfg([*overrides, resume])), run_dir=run_b)
    resumed = _flat_checkpoint(run_b / "checkpoints" / "step_8", tmp_path)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)
