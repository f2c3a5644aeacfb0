"""Shared-table distillation (``distill.share_tables=true``) on 2 gloo ranks, row-wise tables.

The student reads the teacher's pooled embeddings, so each table must be looked
up once and updated once per step: FBGEMM's fused row-wise Adagrad applies its
update inside backward, so a second lookup would be a second update (and a
second accumulator increment). The sharded run is checked step by step against
an unsharded reference in which autograd sums the teacher's and the student's
gradients into one gradient per table and row-wise Adagrad steps once; then
rank 0 exports the served model (the student with the teacher's tables).
(A student that looked the shared tables up a second time fails here: tried
by hand, torchrec's pipeline refuses it -- "Invalid PipelinedForward usage".)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sharding.dist import destroy_distributed, init_distributed
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import reference_optimizers, reference_step, synthetic_tables, unsharded_model
from tests.test_distill import distill_config
from trainer.builder.compression import build_converters
from trainer.config.schema import Config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.export.step import export_step
from trainer.loop.train_pipeline import drain, make_pipeline
from trainer.session import build

BATCH_SIZE = 16  # per rank
NUM_STEPS = 4
ROW_ATOL = 1e-4  # as tests/test_sharding_equivalence.py: reduction order, measured ~5e-5


def _config() -> Config:
    cfg = distill_config(alpha=0.3, temperature=2.0, share_tables=True)
    cfg.sharding.strategy = "row_wise"
    return cfg


def _worker(rank: int, out_dir: str) -> None:
    cfg = _config()
    env = init_distributed(device="cpu")
    try:
        built = build(cfg, env)
        load_unsharded(built.model, torch.load(Path(out_dir) / "init.pt"))
        forward = built.converters.wrap_forward(built.model)
        pipeline = make_pipeline(
            "sparse_dist", built.model, built.optimizer, env.device, model_fwd=forward
        )
        source = SyntheticCriteo(cfg.data)
        batches = rank_batches(
            source,
            "train",
            batch_size=BATCH_SIZE,
            rank=rank,
            world_size=2,
            num_batches=NUM_STEPS,
        )
        losses = []
        for loss, _logits, _labels in drain(pipeline, batches):
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / 2)
        plan = {t: ps.sharding_type for mp in built.plan.plan.values() for t, ps in mp.items()}
        momentum = {k: v for k, v in built.optimizer.state_dict()["state"].items() if "t_cat_" in k}
        shards = local_shards(built.model)
        result = export_step(
            built.model,
            model_config=cfg.model,
            converters=built.converters,
            tables=built.tables,
            source=source,
            eval_batch_size=cfg.trainer.eval_batch_size,
            run_dir=Path(out_dir),
        )
        torch.save(
            {
                "losses": losses,
                "shards": shards,
                "plan": plan,
                "export": result,
                "momentum_keys": sorted(momentum),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


def _reference(cfg: Config, init: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    tables = synthetic_tables(cfg)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    pair = converters.wrap_model(unsharded_model(cfg, device=torch.device("cpu")))
    pair.load_state_dict(init)
    bags = dict(pair.teacher.sparse_arch.embedding_bag_collection.embedding_bags.items())
    table_params = [b.weight for b in bags.values()]
    optimizers = reference_optimizers(pair, table_params, cfg.optim)
    source = SyntheticCriteo(cfg.data)
    losses = []
    for step in range(NUM_STEPS):
        batch = source.batch("train", step * 2 * BATCH_SIZE, 2 * BATCH_SIZE)
        losses.append(reference_step(pair, batch, optimizers))
    return losses, {name: b.weight.detach().clone() for name, b in bags.items()}


@pytest.mark.dist
def test_shared_tables_sharded_update_once_per_step_and_export(tmp_path: Path) -> None:
    cfg = _config()
    tables = synthetic_tables(cfg)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    torch.manual_seed(0)
    init = converters.wrap_model(unsharded_model(cfg, device=torch.device("cpu"))).state_dict()
    assert not any(k.startswith("student.sparse_arch") for k in init)  # one set of tables
    torch.save(init, tmp_path / "init.pt")
    run_ranks(_worker, str(tmp_path), world_size=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(ranks[0]["plan"].values()) == {"row_wise"} and len(ranks[0]["plan"]) == 4

    ref_losses, ref_tables = _reference(cfg, init)
    assert max(ref_losses) - min(ref_losses) > 1e-3  # training moved
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=1e-5, rtol=0
    )
    for name, ref in ref_tables.items():
        key = f"teacher.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"
        full = assemble([r["shards"][key] for r in ranks], tuple(ref.shape))
        start = init[key]
        assert not torch.equal(ref, start), name
        torch.testing.assert_close(
            full, ref, atol=ROW_ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )

    export = ranks[0]["export"]
    assert export == ranks[1]["export"]
    assert sorted(export["bits"]) == [f"t_cat_{i}" for i in range(4)]  # the shared tables
    assert 0.0 <= export["auc"] <= 1.0 and export["max_abs_logit_diff"] < 0.05
    assert (tmp_path / "bundle" / "model.pt2").exists()
