"""ShardSource on tiny shards written with numpy (tests/shard_util.py): batch
contents against the raw arrays, world-size invariance, epochs and shuffling,
the eval hold-out, resume equality and the errors a user can hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.shard_util import EVAL_ID_BASE, bags, sample_ids, write_shards
from trainer.data.shard_format import ShardMetadata, offsets_file, values_file
from trainer.data.shards import ShardSource
from trainer.data.source import DataSource

# Three train parts of uneven sizes (a batch often spans two), one eval part.
PARTS = {"train": [23, 9, 18], "eval": [13]}
NUM_TRAIN = 50


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_shards(tmp_path, PARTS)
    return tmp_path


def reference_rows(directory: Path, split: str) -> dict[int, dict]:
    """Sample identity -> its label, dense row and bags, read sample by sample."""
    meta = ShardMetadata.read(directory)
    mean, std = (np.array(meta.dense_stats[k]) for k in ("mean", "std"))
    rows = {}
    for part in meta.splits[split].parts:
        path = directory / part.path
        dense, labels = np.load(path / "dense.npy"), np.load(path / "labels.npy")
        feats = {
            f.name: (np.load(path / offsets_file(f.name)), np.load(path / values_file(f.name)))
            for f in meta.features
        }
        for i in range(part.num_rows):
            rows[int(dense[i, 0])] = {
                "label": float(labels[i]),
                "dense": ((dense[i] - mean) / std).tolist(),  # the train split's stats
                "bags": {k: val[off[i] : off[i + 1]].tolist() for k, (off, val) in feats.items()},
            }
    return rows


def assert_batch_matches(batch, rows: dict[int, dict]) -> None:
    ids = sample_ids(batch)
    got = bags(batch)
    assert batch.sparse_features.keys() == ["single", "multi"]
    assert batch.sparse_features.lengths().dtype == torch.int32
    for j, sample in enumerate(ids):
        ref = rows[sample]
        assert batch.labels[j].item() == ref["label"]
        assert batch.dense_features[j].tolist() == pytest.approx(ref["dense"], rel=1e-5, abs=1e-5)
        for key in ("single", "multi"):
            assert got[key][j] == ref["bags"][key]


def train_ids(source: ShardSource, *, batch_size: int, world_size: int, steps: range) -> list:
    """Global batches' sample identities, the ranks' batches concatenated."""
    per_rank = [
        list(
            source.train_batches(
                batch_size=batch_size,
                rank=r,
                world_size=world_size,
                first_step=steps.start,
                num_steps=len(steps),
            )
        )
        for r in range(world_size)
    ]
    return [sum((sample_ids(b) for b in step), []) for step in zip(*per_rank)]


def test_features_and_protocol_from_metadata(shards: Path) -> None:
    source = ShardSource(shards, seed=0)
    assert isinstance(source, DataSource)
    assert [(f.name, f.num_embeddings, f.max_ids_per_sample) for f in source.features] == [
        ("single", 50, 1),
        ("multi", 7, 3),
    ]
    assert source.num_dense == 3
    assert source.num_train_samples == NUM_TRAIN
    assert source.num_eval_samples == 13
    assert source.reference_metrics() == {}


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_hold_the_rows_they_name(shards: Path, shuffle: bool) -> None:
    """Single- and multi-hot bags (empty ones too), across part boundaries and epochs."""
    source = ShardSource(shards, seed=3, shuffle=shuffle)
    rows = reference_rows(shards, "train")
    batches = list(
        source.train_batches(batch_size=7, rank=1, world_size=2, first_step=0, num_steps=9)
    )
    for batch in batches:
        assert_batch_matches(batch, rows)
    if not shuffle:  # the stream is the rows in order, epoch after epoch
        assert sample_ids(batches[0]) == list(range(7, 14))
        assert sample_ids(batches[3]) == [49, 0, 1, 2, 3, 4, 5]  # positions 49-55 wrap
    eval_rows = reference_rows(shards, "eval")
    for batch in source.eval_batches(batch_size=4, rank=0, world_size=1):
        assert_batch_matches(batch, eval_rows)


def test_world_sizes_give_the_same_global_batches(shards: Path) -> None:
    source = ShardSource(shards, seed=1)
    one = train_ids(source, batch_size=12, world_size=1, steps=range(0, 10))
    two = train_ids(ShardSource(shards, seed=1), batch_size=6, world_size=2, steps=range(0, 10))
    assert one == two
    # 10 steps of 12 = 120 positions: two full epochs and 20 rows of the third.
    assert sorted(sum(one, [])[:NUM_TRAIN]) == list(range(NUM_TRAIN))


def test_shuffle_is_seeded_and_new_each_epoch(shards: Path) -> None:
    def epochs(seed: int) -> list[list[int]]:
        source = ShardSource(shards, seed=seed)
        flat = sum(train_ids(source, batch_size=10, world_size=1, steps=range(0, 15)), [])
        return [flat[e * NUM_TRAIN : (e + 1) * NUM_TRAIN] for e in range(3)]

    first = epochs(seed=7)
    assert epochs(seed=7) == first
    assert all(sorted(e) == list(range(NUM_TRAIN)) for e in first)  # each row once per epoch
    assert first[0] != first[1] != first[2]
    assert first[0] != list(range(NUM_TRAIN))
    assert epochs(seed=8)[0] != first[0]


def test_resume_sees_the_batches_of_the_uninterrupted_run(shards: Path) -> None:
    def run(first_step: int, num_steps: int) -> list:
        source = ShardSource(shards, seed=5)
        return [
            (sample_ids(b), bags(b), b.labels.tolist())
            for b in source.train_batches(
                batch_size=8, rank=1, world_size=2, first_step=first_step, num_steps=num_steps
            )
        ]

    continuous = run(0, 12)
    assert run(5, 7) == continuous[5:]  # step 5 onwards: epoch 1, then the wrap into 2


def test_eval_split_never_seen_in_training(shards: Path) -> None:
    source = ShardSource(shards, seed=0)
    seen = set(sum(train_ids(source, batch_size=8, world_size=2, steps=range(0, 20)), []))
    assert seen == set(range(NUM_TRAIN))
    per_rank = [
        [sample_ids(b) for b in source.eval_batches(batch_size=2, rank=r, world_size=3)]
        for r in range(3)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # same count on every rank
    evaluated = sum(sum(per_rank, []), [])
    assert len(evaluated) == len(set(evaluated)) == 12  # 13 rows, the last one of 3 skipped
    assert all(i >= EVAL_ID_BASE for i in evaluated)


def test_eval_fraction_holds_out_the_last_rows(tmp_path: Path) -> None:
    write_shards(tmp_path, {"train": [30, 30, 40]})
    source = ShardSource(tmp_path, seed=0, eval_fraction=0.15)
    assert (source.num_train_samples, source.num_eval_samples) == (85, 15)
    seen = set(sum(train_ids(source, batch_size=16, world_size=2, steps=range(0, 20)), []))
    assert seen == set(range(85))
    batches = source.eval_batches(batch_size=4, rank=0, world_size=1)
    evaluated = sum((sample_ids(b) for b in batches), [])
    assert evaluated == list(range(85, 100))
    with pytest.raises(ValueError, match=r"no eval split.*eval_fraction=0.0"):
        ShardSource(tmp_path, seed=0, eval_fraction=0.0)


def test_state_dict_refuses_other_shards(shards: Path, tmp_path: Path) -> None:
    source = ShardSource(shards, seed=0)
    state = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # DCP: tensors only
    ShardSource(shards, seed=0).load_state_dict(state)
    other = tmp_path / "other"
    write_shards(other, PARTS, fingerprint="fp-other", seed=1)
    with pytest.raises(ValueError, match="different prepare config.*fp-test.*fp-other"):
        ShardSource(other, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed: checkpoint 0, now 4"):
        ShardSource(shards, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="dense_norm: checkpoint 'standardize', now 'none'"):
        ShardSource(shards, seed=0, dense_norm="none").load_state_dict(state)


def test_missing_files_name_the_file_and_prepare(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metadata.json.*python -m trainer.prepare"):
        ShardSource(tmp_path / "nowhere", seed=0)
    missing = shards / "train" / "part-00001" / values_file("multi")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*run python -m trainer.prepare"):
        ShardSource(shards, seed=0)


def test_ids_outside_the_table_name_the_file(shards: Path) -> None:
    path = shards / "train" / "part-00002" / values_file("single")
    ids = np.load(path)
    ids[4] = 50  # the table has 50 rows
    np.save(path, ids)
    with pytest.raises(ValueError, match=rf"{path} has id 50.*'single'.*50 rows"):
        ShardSource(shards, seed=0)


def test_inconsistent_part_names_the_file(shards: Path) -> None:
    path = shards / "eval" / "part-00000" / "labels.npy"
    np.save(path, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=rf"{path} has shape \(5,\), expected \(13,\)"):
        ShardSource(shards, seed=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_single_hot_feature_with_an_empty_bag_in_one_part(shards: Path, shuffle: bool) -> None:
    """A part whose single-hot feature has an empty bag takes the jagged path; others do not."""
    part = shards / "train" / "part-00001"
    offsets, values = np.load(part / offsets_file("single")), np.load(part / values_file("single"))
    np.save(part / offsets_file("single"), np.concatenate([offsets[:4], offsets[4:] - 1]))
    np.save(part / values_file("single"), np.delete(values, 3))  # sample 3 of the part: no id
    source = ShardSource(shards, seed=0, shuffle=shuffle)
    rows = reference_rows(shards, "train")
    assert rows[23 + 3]["bags"]["single"] == []
    for batch in source.train_batches(
        batch_size=25, rank=0, world_size=1, first_step=0, num_steps=4
    ):
        assert_batch_matches(batch, rows)


def test_from_config(shards: Path) -> None:
    from trainer.data.data_configs import CriteoDataConfig

    source = ShardSource.from_config(CriteoDataConfig(dir=str(shards), seed=None), seed=9)
    assert (source.seed, source.shuffle) == (9, True)
    assert ShardSource.from_config(CriteoDataConfig(dir=str(shards), seed=2), seed=9).seed == 2
    with pytest.raises(ValueError, match="data.dir is empty.*python -m trainer.prepare"):
        ShardSource.from_config(CriteoDataConfig())


def test_dense_standardized_with_the_train_stats(shards: Path, tmp_path: Path) -> None:
    """Train and eval batches: (x - mean) / std with metadata's train stats; none: raw."""
    meta = ShardMetadata.read(shards)
    mean, std = (np.array(meta.dense_stats[k]) for k in ("mean", "std"))
    assert mean[1:].std() > 0 and (abs(mean[1:]) > 1e-3).any()  # the test can fail
    for norm in ("standardize", "none"):
        source = ShardSource(shards, seed=0, shuffle=False, dense_norm=norm)
        train = next(
            source.train_batches(batch_size=23, rank=0, world_size=1, first_step=0, num_steps=1)
        )
        evaluation = next(source.eval_batches(batch_size=13, rank=0, world_size=1))
        for split, batch in (("train", train), ("eval", evaluation)):
            raw = np.load(shards / split / "part-00000" / "dense.npy")[: len(batch.labels)]
            want = raw if norm == "none" else (raw - mean) / std
            got = batch.dense_features.numpy()
            if norm == "none":
                np.testing.assert_array_equal(got, raw)  # untouched, bit for bit
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A constant column (std 0) is only centred, never divided by zero.
    write_shards(tmp_path, PARTS)
    meta = ShardMetadata.read(tmp_path)
    meta.dense_stats["std"][2] = 0.0
    meta.write(tmp_path)
    batch = next(
        ShardSource(tmp_path, seed=0, shuffle=False).eval_batches(
            batch_size=13, rank=0, world_size=1
        )
    )
    raw = np.load(tmp_path / "eval" / "part-00000" / "dense.npy")
    want = raw[:, 2] - meta.dense_stats["mean"][2]
    np.testing.assert_allclose(batch.dense_features[:, 2].numpy(), want, rtol=1e-5, atol=1e-5)


def test_dense_norm_errors_name_the_fix(shards: Path) -> None:
    meta = ShardMetadata.read(shards)
    meta.dense_stats = {}  # an older prepare's metadata
    meta.write(shards)
    with pytest.raises(ValueError, match=r"no dense_stats.*prepare again.*dense_norm=none"):
        ShardSource(shards, seed=0)
    ShardSource(shards, seed=0, dense_norm="none")
    with pytest.raises(ValueError, match="data.dense_norm='zscore'"):
        ShardSource(shards, seed=0, dense_norm="zscore")
