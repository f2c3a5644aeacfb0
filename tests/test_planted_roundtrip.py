"""The planted round trip: synthetic clicks -> Criteo TSV (benchmarks/planted_to_tsv.py)
-> ``trainer.prepare`` -> shards -> :class:`ShardSource` -> ``python -m trainer``.

Fast: the shards hold exactly the synthetic samples (labels, ids, dense up to
the documented encoding, blanks as missing), and a short run learns from them.
Slow: the whole default run reaches AUC within 0.01 of the planted oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import planted_to_tsv
from tests.distributed import fork_trainer
from trainer.data import SyntheticCriteo, SyntheticDataConfig
from trainer.data.data_configs import CriteoDataConfig
from trainer.data.shards import ShardSource
from trainer.prepare import prepare


def write_and_prepare(out: Path, *, num_train: int, num_eval: int, blank: float) -> dict:
    info = planted_to_tsv.write_planted_tsv(
        out, num_train=num_train, num_eval=num_eval, blank_fraction=blank
    )
    prepare(
        CriteoDataConfig(
            raw=[str(out / "train.tsv")],
            eval_raw=[str(out / "eval.tsv")],
            table_rows=info["table_rows"],
            dir=str(out / "shards"),
            num_workers=1,
        )
    )
    return info


def train(out: Path, run_dir: Path, *overrides: str) -> dict:
    """``python -m trainer data=criteo`` on the prepared shards, one process."""
    fork_trainer("data=criteo", f"data.dir={out / 'shards'}", *overrides, run_dir=run_dir, nproc=1)
    return json.loads((run_dir / "summary.json").read_text())


def test_shards_hold_the_planted_samples(tmp_path: Path) -> None:
    write_and_prepare(tmp_path, num_train=3000, num_eval=1000, blank=0.05)
    shards = ShardSource(tmp_path / "shards", seed=0, shuffle=False, dense_norm="none")
    assert [f.num_embeddings for f in shards.features] == [
        c + 1 for c in SyntheticDataConfig().cardinalities
    ]
    synthetic = SyntheticCriteo(SyntheticDataConfig(num_eval_samples=1000))
    train = shards.train_batches(batch_size=3000, rank=0, world_size=1, first_step=0, num_steps=1)
    evaluation = shards.eval_batches(batch_size=1000, rank=0, world_size=1)
    for split, got in (("train", next(train)), ("eval", next(evaluation))):
        want = synthetic.batch(split, 0, got.labels.shape[0])
        assert got.labels.tolist() == want.labels.tolist()
        ids, rows = want.sparse_features.values().numpy(), got.sparse_features.values().numpy()
        blank_ids = rows == 0  # a blank categorical field is the missing-value row 0
        assert np.array_equal(rows[~blank_ids], ids[~blank_ids] + 1)
        x, dense = want.dense_features.numpy(), got.dense_features.numpy()
        blank_dense = dense == 0  # a blank integer field is 0, log1p(0) = 0
        close = ~blank_dense & (x > -3)  # below, exp(x + 5) - 1 rounds to a few units
        assert np.abs(dense[close] - (x[close] + planted_to_tsv.DENSE_SHIFT)).max() < 0.07
        for blanks in (blank_ids, blank_dense):
            assert 0.04 < blanks.mean() < 0.06


@pytest.mark.dist
def test_short_run_learns_from_the_planted_tsv(tmp_path: Path) -> None:
    write_and_prepare(tmp_path, num_train=16384, num_eval=4096, blank=0.01)
    summary = train(
        tmp_path,
        tmp_path / "run",
        "trainer=smoke",
        "trainer.num_steps=96",  # 1.5 epochs of 256
        "trainer.eval_every_steps=96",
    )
    assert summary["steps"] == 96
    assert summary["auc"] > 0.55, summary  # 0.582 measured (4096 eval rows: +-0.01)


@pytest.mark.slow
def test_prepare_and_train_reach_the_oracle_auc(tmp_path: Path) -> None:
    """The default run (2000 steps of 1024) on 2,048,000 planted rows, one epoch."""
    info = write_and_prepare(tmp_path, num_train=2_048_000, num_eval=65536, blank=0.01)
    summary = train(tmp_path, tmp_path / "run")
    assert abs(summary["auc"] - info["oracle_auc"]) < 0.01, (summary["auc"], info["oracle_auc"])
