"""Pruning: embedding rows at export (ids remapped), dense weights by magnitude on a schedule."""

from __future__ import annotations

import pytest
import torch

from compression.prune import DensePruning, RemapIds, RowPruning, prune_rows
from compression.serving import quantize_for_serving
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import tiny_config
from trainer.config.schema import ConfigError
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo

PRUNED_IDS = torch.arange(0, 30)  # of t_cat_1 (100 rows)


def _model_and_batch():  # noqa: ANN202
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu")).model.eval()
    weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight
    with torch.no_grad():
        weight[PRUNED_IDS] *= 1e-3
    batch = next(
        iter(
            SyntheticCriteo(cfg.data).train_batches(
                batch_size=512, rank=0, world_size=1, first_step=0, num_steps=1
            )
        )
    )
    return model, batch, weight


def _uses_pruned(batch) -> torch.Tensor:  # noqa: ANN001
    """Per sample: whether any of its t_cat_1 ids was pruned."""
    jt = batch.sparse_features["cat_1"]
    hit = torch.isin(jt.values(), PRUNED_IDS).float()
    per_sample = torch.segment_reduce(hit, "sum", lengths=jt.lengths())
    return per_sample > 0


@torch.no_grad()
def test_row_pruning_leaves_predictions_of_kept_ids_unchanged() -> None:
    model, batch, weight = _model_and_batch()
    min_norm = float(weight[PRUNED_IDS].norm(dim=1).max()) * 1.01
    assert min_norm < float(weight[30:].norm(dim=1).min())  # only the scaled rows go
    pruned, report = prune_rows(model, min_norm=min_norm)

    assert report["t_cat_1"] == {
        "rows": 100,
        "rows_kept": 70,
        "fp32_bytes": 100 * 8 * 4,
        "fp32_bytes_kept": 71 * 8 * 4,  # with the default row
    }
    assert all(r["rows"] == r["rows_kept"] for name, r in report.items() if name != "t_cat_1")
    remap = pruned.sparse_arch.embedding_bag_collection
    assert isinstance(remap, RemapIds)
    assert remap.module.embedding_bags["t_cat_1"].weight.shape == (71, 8)  # kept + default

    before = model(batch.dense_features, batch.sparse_features).flatten()
    after = pruned(batch.dense_features, batch.sparse_features).flatten()
    kept = ~_uses_pruned(batch)
    assert kept.sum() > 50 and (~kept).sum() > 50
    torch.testing.assert_close(after[kept], before[kept], rtol=0, atol=0)
    # Pruned ids read the shared default row, so their samples do change.
    assert not torch.equal(after[~kept], before[~kept])

    # Quantized after pruning (the export order): still the kept rows' served values.
    served = quantize_for_serving(pruned, table_bits={"t_cat_1": 4})
    logits = served(batch.dense_features, batch.sparse_features).flatten()
    assert torch.isfinite(logits).all()


def test_row_pruning_converter_reports_rows_kept() -> None:
    model, _batch, weight = _model_and_batch()
    converter = RowPruning(min_norm=float(weight[PRUNED_IDS].detach().norm(dim=1).max()) * 1.01)
    served = converter.to_serving(model)
    assert served is not model
    report = converter.export_summary()["row_pruning"]
    assert report["rows"] == 40 + 100 + 7 + 64 and report["rows_kept"] == report["rows"] - 30


def test_dense_pruning_reaches_its_sparsity_on_schedule() -> None:
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu"))
    pruning = DensePruning(sparsity=0.5, start_step=2, end_step=6, every_steps=2)
    assert [pruning.target(s) for s in range(8)] == [0, 0, 0, 0, 0.25, 0.25, 0.5, 0.5]
    pruning.convert_sharded(model, device=torch.device("cpu"), process_group=None)
    assert len(pruning.linears) == 4  # bottom MLP 2, top MLP 2
    optimizer = pruning.wrap_optimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=0.01),
        device=torch.device("cpu"),
        process_group=None,
    )
    forward = pruning.wrap_forward(model)
    source = SyntheticCriteo(cfg.data)
    reached = []
    for batch in source.train_batches(
        batch_size=64, rank=0, world_size=1, first_step=0, num_steps=8
    ):
        optimizer.zero_grad()
        loss, _ = forward(batch)
        loss.backward()
        optimizer.step()
        reached.append(round(pruning.sparsity_reached(), 2))
    # Adam moves every weight each step, so only the masks make zeros.
    assert reached[:2] == [0.0, 0.0]
    assert reached[4] == pytest.approx(0.25, abs=0.01) and reached[-1] == pytest.approx(
        0.5, abs=0.01
    )
    # A checkpoint restores the masks, and they are applied at once.
    state = pruning.state_dict()
    other = DensePruning(sparsity=0.5, start_step=2, end_step=6, every_steps=2)
    fresh = unsharded_model(cfg, device=torch.device("cpu"))
    other.convert_sharded(fresh, device=torch.device("cpu"), process_group=None)
    other.load_state_dict(state)
    assert other.step == 8 and other.sparsity_reached() == pytest.approx(0.5, abs=0.01)


def test_bad_prune_settings_name_the_key() -> None:
    cfg = tiny_config("table_wise")
    cfg.prune.dense_sparsity = 1.0
    with pytest.raises(ConfigError, match="prune.dense_sparsity"):
        validate(cfg)
    cfg.prune.dense_sparsity, cfg.prune.dense_start_step = 0.5, 10
    with pytest.raises(ConfigError, match="prune.dense_start_step"):
        validate(cfg)
