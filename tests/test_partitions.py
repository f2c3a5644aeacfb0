"""Partitions (trainer/prepare/partitions.py): days prepared one at a time into one dataset.

Two Criteo days, each prepared by its own ``python -m trainer.prepare`` process
into the same ``data.dir`` with ``mapping=vocab``: every id of day 0's
vocabulary has the same row in day 1's shards, ids new on day 1 get rows after
day 0's, the tables keep ``table_rows`` rows. With hashing a partition's rows
are those of a whole prepare of the same file. A bad day, or one prepared with
other settings, never reaches the manifest; a listed day is never rewritten.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import run
from tests.test_criteo_tsv import reference_row
from tests.test_prepare_criteo import read_split, write_tsv
from trainer.data.criteo_tsv import CAT_NAMES, NUM_CAT, NUM_INT
from trainer.data.data_configs import CriteoDataConfig
from trainer.data.partitions import Manifest
from trainer.data.shards import ShardSource
from trainer.prepare import PrepareError, prepare

REPO = Path(__file__).resolve().parents[1]
TABLE_ROWS = 64
SETTINGS = dict(table_rows=[TABLE_ROWS], min_count=2, eval_fraction=0.1, num_workers=1)


def day_lines(n: int, *, low: int, high: int, seed: int) -> list[str]:
    """Criteo lines whose ids are drawn from ``[low, high)``; the label follows cat_0's parity."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ids = rng.integers(low, high, NUM_CAT)
        ints = rng.integers(0, 100, NUM_INT)
        label = int(ids[0] % 2 == 0) if rng.random() < 0.8 else int(rng.random() < 0.5)
        cats = ["" if rng.random() < 0.05 else format(int(v), "08x") for v in ids]
        lines.append("\t".join([str(label), *map(str, ints), *cats]))
    return lines


def prepare_cli(*overrides: str) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "trainer.prepare", "data=criteo", *overrides],
        cwd=REPO,
        timeout=120,
    )


def shard_rows(directory: Path) -> np.ndarray:
    """Every row's ids (train then eval: the raw file's order), [rows, NUM_CAT]."""
    return np.concatenate([read_split(directory, s)["ids"] for s in ("train", "eval")])


def raw_ids(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [reference_row(line) for line in lines]
    return np.array([r[2] for r in rows], np.uint64), np.array([r[3] for r in rows])


def test_vocab_ids_keep_their_rows_across_appended_partitions(tmp_path: Path) -> None:
    dataset = tmp_path / "days"
    days = [day_lines(400, low=0, high=40, seed=0), day_lines(400, low=20, high=90, seed=1)]
    common = [
        f"data.dir={dataset}",
        "data.mapping=vocab",
        f"data.table_rows=[{TABLE_ROWS}]",
        "data.min_count=2",
        "data.eval_fraction=0.1",
        "data.num_workers=1",
    ]
    for day, lines in enumerate(days):  # two separate prepare processes
        raw = write_tsv(tmp_path / f"day_{day}", lines)
        done = prepare_cli(f"data.raw=[{raw}]", f"data.partition=day_{day}", *common)
        assert done.returncode == 0, done.stderr[-2000:]
    manifest = Manifest.read(dataset)
    assert manifest.names == ["day_0", "day_1"] and manifest.mapping == "vocab"
    assert [p.vocab_version for p in manifest.partitions] == [0, 1]
    assert [p.table_rows for p in manifest.partitions] == [[TABLE_ROWS] * NUM_CAT] * 2
    assert manifest.partitions[1].num_rows == {"train": 360, "eval": 40}
    parts = [dataset / p.path for p in manifest.partitions]
    vocab = [[np.load(p / "vocab" / f"{f}.ids.npy") for f in CAT_NAMES] for p in parts]
    ids, present = raw_ids(days[1])
    rows = shard_rows(parts[1])
    grew = 0
    for f in range(NUM_CAT):
        old, new = vocab[0][f], vocab[1][f]
        np.testing.assert_array_equal(new[: old.size], old)  # a prefix: nothing renumbered
        assert new.size <= TABLE_ROWS - 2 and new.size > old.size
        grew += new.size - old.size
        row_of_old = {int(i): 2 + r for r, i in enumerate(old)}
        row_of_new = {int(i): 2 + r for r, i in enumerate(new)}
        for k in range(len(days[1])):
            got, raw = int(rows[k, f]), int(ids[k, f])
            if not present[k, f]:
                assert got == 0
            elif raw in row_of_old:  # seen on day 0: day 0's row
                assert got == row_of_old[raw]
            elif raw in row_of_new:  # new on day 1: a row after day 0's
                assert got == row_of_new[raw] >= 2 + old.size
            else:  # under min_count (or the table was full): the shared OOV row
                assert got == 1
    assert grew > 0
    # Day 0's own shards still read with day 0's rows, and both open with the same tables.
    day0 = ShardSource(parts[0], seed=0)
    day1 = ShardSource(parts[1], seed=0)
    assert [f.num_embeddings for f in day0.features] == [f.num_embeddings for f in day1.features]
    # The same day again is a no-op; other inputs under a listed name are refused.
    settings = dict(mapping="vocab", table_rows=[TABLE_ROWS], min_count=2, eval_fraction=0.1)
    again = prepare(
        CriteoDataConfig(
            raw=[str(tmp_path / "day_1")], dir=str(dataset), partition="day_1", **settings
        ),
        progress=False,
    )
    assert again.up_to_date and again.directory == parts[1]
    with pytest.raises(PrepareError, match="append-only"):
        prepare(
            CriteoDataConfig(
                raw=[str(tmp_path / "day_0")], dir=str(dataset), partition="day_1", **settings
            ),
            progress=False,
        )


def _cfg(dataset: Path, raw: Path, partition: str, **kw) -> CriteoDataConfig:
    base = dict(raw=[str(raw)], dir=str(dataset), partition=partition, **SETTINGS)
    return CriteoDataConfig(**{**base, **kw})


def test_hash_partitions_map_as_a_whole_prepare(tmp_path: Path) -> None:
    lines = day_lines(300, low=0, high=10**6, seed=2)
    raw = write_tsv(tmp_path / "day_0", lines)
    part = prepare(_cfg(tmp_path / "days", raw, "day_0"), progress=False)
    whole = prepare(
        CriteoDataConfig(raw=[str(raw)], dir=str(tmp_path / "whole"), **SETTINGS), progress=False
    )
    np.testing.assert_array_equal(shard_rows(part.directory), shard_rows(whole.directory))
    ids, present = raw_ids(lines)
    want = np.where(present, 1 + ids % np.uint64(TABLE_ROWS - 1), 0)
    np.testing.assert_array_equal(shard_rows(part.directory), want.astype(np.int64))
    assert Manifest.read(tmp_path / "days").partitions[0].vocab_version is None


def test_a_bad_or_mismatched_partition_never_reaches_the_manifest(tmp_path: Path) -> None:
    dataset = tmp_path / "days"
    good = write_tsv(tmp_path / "day_0", day_lines(200, low=0, high=30, seed=3))
    prepare(_cfg(dataset, good, "day_0", mapping="vocab"), progress=False)
    before = (dataset / "manifest.json").read_text()
    bad_lines = day_lines(200, low=0, high=30, seed=4)
    bad_lines[150] = "2\tnot a criteo line"
    bad = write_tsv(tmp_path / "day_1", bad_lines)
    with pytest.raises(PrepareError, match="day_1:151"):
        prepare(_cfg(dataset, bad, "day_1", mapping="vocab"), progress=False)
    with pytest.raises(PrepareError, match="data.min_count=3"):
        prepare(_cfg(dataset, good, "day_1", mapping="vocab", min_count=3), progress=False)
    assert (dataset / "manifest.json").read_text() == before
    assert sorted(p.name for p in (dataset / "partitions").iterdir()) == ["day_0"]
    # A partition directory left unlisted (a prepare killed before the manifest) is replaced.
    (dataset / "partitions" / "day_1").mkdir()
    (dataset / "partitions" / "day_1" / "junk").write_text("half written")
    good_1 = write_tsv(tmp_path / "day_1b", day_lines(200, low=10, high=40, seed=5))
    prepare(_cfg(dataset, good_1, "day_1", mapping="vocab"), progress=False)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [p["name"] for p in manifest["partitions"]] == ["day_0", "day_1"]
    assert not (dataset / "partitions" / "day_1" / "junk").exists()
    with pytest.raises(PrepareError, match="data.partition"):
        prepare(_cfg(dataset, good, "../escape", mapping="vocab"), progress=False)
    # A partitioned dataset is not one whole dataset: the reader says what to do.
    with pytest.raises(FileNotFoundError, match="online.follow"):
        ShardSource(dataset, seed=0)
