"""Row pruning by access count (``prune.rows_by=access``): counted in training, used at export.

In process: the counter equals a per-feature bincount of the batches it saw;
rows never looked up go, and samples whose ids were all seen keep their
predictions. Over 2 torchrun ranks (row-wise tables): the checkpointed counts
are the sum of both ranks' batches, a run resumed from step 4 ends with the
same counts and the same pruned export as an uninterrupted one, and the
offline export of the checkpoint prunes the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from compression.access_counts import AccessCounter
from compression.converter import Converters
from compression.prune import RowPruning, prune_rows
from tests.distributed import torchrun_trainer
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import tiny_config
from trainer.config.saved import read_config
from trainer.config.schema import ConfigError
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo
from trainer.export.offline import _saved_converter_state, export_checkpoint

FEATURE_ROWS = {"cat_0": 40, "cat_1": 100, "cat_2": 7, "cat_3": 64}


def _reference_counts(batches: list) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {
        f: sum(torch.bincount(b.sparse_features[f].values(), minlength=rows) for b in batches)
        for f, rows in FEATURE_ROWS.items()
    }


def _batches(cfg, *, num_steps: int, first_step: int = 0, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN202
    return list(
        SyntheticCriteo(cfg.data).train_batches(
            batch_size=8,
            rank=rank,
            world_size=world_size,
            first_step=first_step,
            num_steps=num_steps,
        )
    )


def test_counter_counts_each_features_ids() -> None:
    cfg = tiny_config("table_wise")
    batches = _batches(cfg, num_steps=3)
    counter = AccessCounter(FEATURE_ROWS)
    for b in batches:
        counter.add(b.sparse_features)
    got = counter.synced()
    for feature, expected in _reference_counts(batches).items():
        assert torch.equal(got[feature], expected), feature
    assert int(got["cat_1"].sum()) == 3 * 8 * 3  # 3 steps x 8 samples x hotness 3


@torch.no_grad()
def test_rows_never_accessed_go_and_seen_ids_keep_their_predictions() -> None:
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu"))
    pruning = RowPruning(min_access=1, feature_rows=FEATURE_ROWS)
    pruning.convert_sharded(model, device=torch.device("cpu"), process_group=None)
    forward = pruning.wrap_forward(model)
    train = _batches(cfg, num_steps=2)  # 16 samples: most rows of cat_1/cat_3 unseen
    model.train()
    for b in train:
        forward(b)
    model.eval()
    forward(_batches(cfg, num_steps=1, first_step=50)[0])  # eval: not counted
    seen = _reference_counts(train)
    assert torch.equal(pruning.access_counts()["cat_1"], seen["cat_1"])

    served = pruning.to_serving(model.model)
    report = pruning.export_summary()["row_pruning"]
    for i, feature in enumerate(FEATURE_ROWS):
        assert report["tables"][f"t_cat_{i}"]["rows_kept"] == int((seen[feature] > 0).sum())
    assert report["rows_kept"] < report["rows"] and report["fp32_bytes_saved"] > 0

    batch = next(
        iter(
            SyntheticCriteo(cfg.data).train_batches(
                batch_size=512, rank=0, world_size=1, first_step=100, num_steps=1
            )
        )
    )
    all_seen = torch.ones(512, dtype=torch.bool)
    for feature in FEATURE_ROWS:
        jt = batch.sparse_features[feature]
        unseen = (seen[feature][jt.values()] == 0).float()
        all_seen &= torch.segment_reduce(unseen, "sum", lengths=jt.lengths()) == 0
    assert all_seen.sum() > 0 and (~all_seen).sum() > 100
    before = model.model(batch.dense_features, batch.sparse_features).flatten()
    after = served(batch.dense_features, batch.sparse_features).flatten()
    torch.testing.assert_close(after[all_seen], before[all_seen], rtol=0, atol=0)
    assert not torch.equal(after[~all_seen], before[~all_seen])
    # The same rows as prune_rows given the counts directly.
    _, direct = prune_rows(model.model, access_counts=seen, min_access=1)
    assert direct == pruning.report


def test_counts_survive_a_checkpoint_round_trip(tmp_path: Path) -> None:
    """The converter's state through DCP files (one process); the 2-rank resume is slow-tier."""
    cfg = tiny_config("table_wise")
    batches = _batches(cfg, num_steps=2)
    pruning = RowPruning(min_access=2, feature_rows=FEATURE_ROWS)
    for b in batches:
        pruning.counter.add(b.sparse_features)
    dcp.save({"compression": Converters([pruning])}, checkpoint_id=tmp_path, no_dist=True)
    fresh = Converters([RowPruning(min_access=2, feature_rows=FEATURE_ROWS)])
    fresh.load_state_dict(_saved_converter_state(tmp_path))
    loaded = next(iter(fresh)).access_counts()
    for feature, expected in _reference_counts(batches).items():
        assert torch.equal(loaded[feature], expected), feature


def test_access_settings_name_the_key() -> None:
    cfg = tiny_config("table_wise")
    cfg.prune.min_access = 2
    with pytest.raises(ConfigError, match="prune.rows_by=access"):
        validate(cfg)
    cfg.prune.rows_by = "often"
    with pytest.raises(ConfigError, match="prune.rows_by=often"):
        validate(cfg)


TINY = [
    "trainer=smoke",
    "trainer.num_steps=8",
    "trainer.batch_size=16",
    "trainer.eval_every_steps=8",
    "trainer.eval_batch_size=512",
    "trainer.checkpoint_every_steps=4",
    "trainer.export=true",
    "data.num_eval_samples=1024",
    "data.num_dense=4",
    "data.cardinalities=[40,100,7,64]",
    "data.hotness=[1,3,1,2]",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,1]",
    "sharding=row_wise",
    "prune.rows_by=access",
    "prune.min_access=1",
]


@pytest.mark.dist
@pytest.mark.slow  # three 2-rank jobs and an offline export: ~80 s on 2 busy cores
def test_two_rank_counts_survive_a_resume_and_reach_the_export(tmp_path: Path) -> None:
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    torchrun_trainer(*TINY, run_dir=run)
    torchrun_trainer(*TINY, f"trainer.resume={run / 'checkpoints' / 'step_4'}", run_dir=resumed)

    # Both ranks' batches of all 8 steps, whichever process counted them.
    data = read_config(run / "checkpoints" / "step_8").data
    batches = [
        b
        for rank in (0, 1)
        for b in SyntheticCriteo(data).train_batches(
            batch_size=16, rank=rank, world_size=2, first_step=0, num_steps=8
        )
    ]
    expected = _reference_counts(batches)
    for directory in (run, resumed):
        saved = _saved_converter_state(directory / "checkpoints" / "step_8")["row_pruning"]
        for feature, counts in expected.items():
            assert torch.equal(saved[f"access_{feature}"], counts), (directory.name, feature)

    first = json.loads((run / "summary.json").read_text())["export"]
    again = json.loads((resumed / "summary.json").read_text())["export"]
    assert first["row_pruning"] == again["row_pruning"]
    assert first["row_pruning"]["rows_kept"] == sum(int((c > 0).sum()) for c in expected.values())
    assert first["row_pruning"]["rows_kept"] < first["row_pruning"]["rows"]
    assert 0.0 <= first["auc"] <= 1.0
    offline = export_checkpoint(run / "checkpoints" / "step_8", out=tmp_path / "offline.pt")
    assert offline["row_pruning"] == first["row_pruning"]
    assert offline["auc"] == pytest.approx(first["auc"], abs=1e-6)
