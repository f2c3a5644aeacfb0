"""DeepFM and Wide&Deep sharded on two gloo ranks: same training as unsharded, and
the QAT export (quantize_for_serving) computes what the QAT eval computed.

The equivalence cases train the tiny config of tests/test_sharding_equivalence.py
(its reference machinery: row-wise Adagrad tables, gradients times the world
size) with ``model.arch`` deepfm or wide_deep, so the wide ``w_<table>`` tables
are sharded and compared too. The export cases train with int4 table QAT and
export on rank 0 the way ``trainer.export`` does (gather, build_trained,
``Converters.to_serving`` against ``Converters.as_trained_eval``), one as a
plain DeepFM, one as a Wide&Deep student of a DLRM-DCNv2 teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from compression.serving import gather_full_state
from sharding import DistEnv, destroy_distributed, init_distributed
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import (
    block_width,
    reference_optimizers,
    reference_step,
    table_bags,
    table_parameters,
    unsharded_model,
)
from tests.test_sharding_equivalence import BATCH_SIZE, LOSS_ATOL, NUM_STEPS, ROW_ATOL, tiny_config
from trainer.builder.model import build_trained
from trainer.config.schema import Config, DistillConfig
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.session import build

EQUIVALENCE = {
    "deepfm-row_wise": ("deepfm", "row_wise"),
    "deepfm-column_wise": ("deepfm", "column_wise"),
    "wide_deep-table_wise": ("wide_deep", "table_wise"),
}
EXPORTS = ["deepfm-qat4", "distill-dcn-to-wide_deep-qat4"]
# Serving reads scale * code + bias in fp32 as the fake quantization does (test_export).
EXPORT_ATOL = 1e-5


def _case_config(case: str) -> Config:
    if case in EQUIVALENCE:
        arch, strategy = EQUIVALENCE[case]
        cfg = tiny_config(strategy)
        cfg.model.arch = arch
        return cfg
    cfg = tiny_config("row_wise")
    if case == "deepfm-qat4":
        cfg.model.arch = "deepfm"
        cfg.qat.bits = 4
        return cfg
    cfg.model.arch = "dlrm_dcnv2"
    cfg.model.dcn_low_rank_dim = 4
    cfg.distill = DistillConfig(
        name="online",
        arch="wide_deep",
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
        student_qat_bits=4,
    )
    return cfg


def _worker(rank: int, cases: list[str], out_dir: str) -> None:
    env = init_distributed(device="cpu")
    try:
        for case in cases:
            _train_case(rank, env, case, Path(out_dir))
    finally:
        destroy_distributed()


def _train_case(rank: int, env: DistEnv, case: str, out_dir: Path) -> None:
    cfg = _case_config(case)
    built = build(cfg, env)
    if case in EQUIVALENCE:
        load_unsharded(built.model, torch.load(out_dir / f"{case}-init.pt"))
    pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
    source = SyntheticCriteo(cfg.data)
    batches = rank_batches(
        source, "train", batch_size=BATCH_SIZE, rank=rank, world_size=2, num_batches=NUM_STEPS
    )
    losses = []
    for loss, _logits, _labels in drain(pipeline, batches):
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / env.world_size)
    plan = {t: ps.sharding_type for mp in built.plan.plan.values() for t, ps in mp.items()}
    result: dict = {"losses": losses, "plan": plan}
    if case in EQUIVALENCE:
        result["shards"] = local_shards(built.model)
    else:
        full = gather_full_state(built.model)  # collective
        if rank == 0:
            result["export"] = _export(cfg, built, full, source)
    torch.save(result, out_dir / f"{case}-rank{rank}.pt")


@torch.no_grad()
def _export(cfg: Config, built, full: dict, source: SyntheticCriteo) -> dict:  # noqa: ANN001
    """trainer.export's steps on rank 0 (trainer/export/step.py), without the bundle."""
    trained = build_trained(
        cfg.model, tables=built.tables, num_dense=cfg.data.num_dense, converters=built.converters
    )
    trained.load_state_dict(full)
    predictor = trained.model  # the student when distilling
    predictor.eval()
    served = built.converters.to_serving(predictor)
    fp32 = [predictor(*_inputs(source)).flatten()]
    built.converters.as_trained_eval(predictor)
    batch = _inputs(source)
    served_logits, want = served(*batch).flatten(), predictor(*batch).flatten()
    quant = [m for m in served.modules() if isinstance(m, QuantEmbeddingBagCollection)]
    return {
        "max_abs_logit_diff": float((served_logits - want).abs().max()),
        "quantization_shift": float((served_logits - fp32[0]).abs().max()),
        "types": {t.name: t.data_type.value for q in quant for t in q.embedding_bag_configs()},
        "served": type(predictor).__name__,
    }


def _inputs(source: SyntheticCriteo) -> tuple:
    batch = source.batch("eval", 0, 512)
    return batch.dense_features, batch.sparse_features


def _reference(cfg: Config, init: dict, plan: dict[str, str]) -> tuple[list[float], dict]:
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    # Both collections: the field tables and the wide ones.
    named = table_bags(model)
    width = cfg.sharding.column_shard_dim
    tables = [
        p for n, t in named.items() for p in table_parameters(t, width=block_width(plan[n], width))
    ]
    optimizers = reference_optimizers(model, tables, cfg.optim)
    source = SyntheticCriteo(cfg.data)
    losses = [
        reference_step(model, source.batch("train", s * 2 * BATCH_SIZE, 2 * BATCH_SIZE), optimizers)
        for s in range(NUM_STEPS)
    ]
    weights = {
        k: named[k.split(".")[-2]].weight.detach().clone() for k in init if "embedding_bags" in k
    }
    return losses, weights


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ctr2")
    for case in EQUIVALENCE:
        torch.manual_seed(0)
        init = unsharded_model(_case_config(case), device=torch.device("cpu")).state_dict()
        torch.save(init, out / f"{case}-init.pt")
    run_ranks(_worker, [*EQUIVALENCE, *EXPORTS], str(out), world_size=2)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("case", list(EQUIVALENCE))
def test_sharded_ctr_matches_unsharded(case: str, two_ranks: Path) -> None:
    cfg = _case_config(case)
    init = torch.load(two_ranks / f"{case}-init.pt")
    ranks = [torch.load(two_ranks / f"{case}-rank{r}.pt") for r in range(2)]
    plan = ranks[0]["plan"]
    strategy = EQUIVALENCE[case][1]
    assert set(plan) == {f"{p}t_cat_{i}" for p in ("", "w_") for i in range(4)}
    assert set(plan.values()) == {strategy}, plan  # the wide tables are sharded too
    ref_losses, ref_tables = _reference(cfg, init, plan)
    assert max(ref_losses) - min(ref_losses) > 1e-3
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=LOSS_ATOL, rtol=0
    )
    for key, ref in ref_tables.items():
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        assert not torch.equal(ref, init[key]), f"{key}: reference rows never moved"
        torch.testing.assert_close(
            full, ref, atol=ROW_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )
        if ".w_" in key:  # a wide row is [w, 0, 0, 0]: the padding never moves
            assert torch.equal(full[:, 1:], torch.zeros_like(full[:, 1:])), key


@pytest.mark.dist
@pytest.mark.parametrize("case", EXPORTS)
def test_ctr_qat_export_equals_fake_quantized_eval(case: str, two_ranks: Path) -> None:
    result = torch.load(two_ranks / f"{case}-rank0.pt")
    export = result["export"]
    if case.startswith("distill"):
        # The served model is the Wide&Deep student, its own tables int4; a DCN teacher.
        assert export["served"] == "CTRModel"
        want = {f"{p}s_t_cat_{i}": "INT4" for p in ("", "w_") for i in range(4)}
        assert {n for n in result["plan"] if n.startswith("t_")} == {f"t_cat_{i}" for i in range(4)}
    else:
        want = {f"{p}t_cat_{i}": "INT4" for p in ("", "w_") for i in range(4)}
    assert export["types"] == want
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert export["quantization_shift"] > 1e-5, "int4 changed nothing: was it applied?"
    assert export["max_abs_logit_diff"] <= EXPORT_ATOL, export
