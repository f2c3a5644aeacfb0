"""``python -m trainer.prepare`` on Criteo TSV: real files in, shards out, read back.

Small files (a few thousand lines), small ``chunk_bytes`` so that several
ranges, chunks and parts (and two worker processes) are really exercised.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import run
from tests.test_criteo_tsv import reference_row
from trainer.data.criteo_tsv import CAT_NAMES, NUM_CAT, NUM_INT
from trainer.data.data_configs import CriteoDataConfig
from trainer.data.shard_format import ShardMetadata, offsets_file, values_file
from trainer.prepare import PrepareError, prepare
from trainer.prepare.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
ROWS = [7, 5, 100, 50] + [1000] * (NUM_CAT - 4)


def criteo_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = [("" if rng.random() < 0.1 else str(v)) for v in rng.integers(-3, 3000, NUM_INT)]
        cats = [
            ("" if rng.random() < 0.05 else format(v, "08x"))
            for v in rng.integers(0, 60 if i % 2 else 2**32, NUM_CAT)
        ]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]))
    return lines


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def cfg(tmp_path: Path, raw: list[Path], **kw) -> CriteoDataConfig:
    base = dict(dir=str(tmp_path / "out"), table_rows=ROWS, chunk_bytes=20_000, num_workers=2)
    return CriteoDataConfig(raw=[str(p) for p in raw], **{**base, **kw})


def read_split(directory: Path, split: str) -> dict[str, np.ndarray]:
    """A split's arrays, its parts concatenated (offsets turned into per-row ids)."""
    meta = ShardMetadata.read(directory)
    out: dict[str, list] = {"labels": [], "dense": [], "ids": []}
    for part in meta.splits[split].parts:
        path = directory / part.path
        out["labels"].append(np.load(path / "labels.npy"))
        out["dense"].append(np.load(path / "dense.npy"))
        ids = []
        for f in CAT_NAMES:
            offsets = np.load(path / offsets_file(f))
            assert (np.diff(offsets) == 1).all()
            ids.append(np.load(path / values_file(f)))
        out["ids"].append(np.stack(ids, axis=1))
    return {k: np.concatenate(v) for k, v in out.items()}


def expected_arrays(lines: list[str]) -> dict[str, np.ndarray]:
    labels, dense, ids = [], [], []
    for line in lines:
        label, d, raw, present = reference_row(line)
        labels.append(label)
        dense.append(d)
        ids.append([1 + r % (rows - 1) if p else 0 for r, p, rows in zip(raw, present, ROWS)])
    return {"labels": np.array(labels), "dense": np.array(dense), "ids": np.array(ids)}


def blank_dense(lines: list[str]) -> np.ndarray:
    """Which integer fields of the lines are empty."""
    return np.array([[f == "" for f in line.split("\t")[1 : 1 + NUM_INT]] for line in lines])


def train_stats(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """numpy's per-column mean and std of the train split's present dense values."""
    train = read_split(directory, "train")["dense"].astype(np.float64)
    masked = np.ma.masked_array(train, mask=(train == 0) & np.signbit(train))
    return masked.mean(axis=0).filled(0.0), masked.std(axis=0).filled(0.0)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return criteo_lines(2000)


def test_hash_shards_match_reference_and_eval_is_the_tail(tmp_path, lines):
    raw = write_tsv(tmp_path / "day_0.tsv", lines)
    result = prepare(cfg(tmp_path, [raw], eval_fraction=0.1), progress=False)
    meta = result.metadata
    assert not result.up_to_date
    assert meta.splits["train"].num_rows == 1800 and meta.splits["eval"].num_rows == 200
    assert len(meta.splits["train"].parts) > 1  # several ranges, in order
    for split, rows in (("train", lines[:1800]), ("eval", lines[1800:])):
        got, want = read_split(result.directory, split), expected_arrays(rows)
        np.testing.assert_array_equal(got["labels"], want["labels"])
        np.testing.assert_allclose(got["dense"], want["dense"], rtol=1e-6)
        np.testing.assert_array_equal(got["ids"], want["ids"])
    assert [f.num_embeddings for f in meta.features] == ROWS
    assert meta.mapping["kind"] == "hash" and meta.source == "criteo"
    assert meta.inputs[0]["path"] == str(raw) and meta.inputs[0]["size"] == raw.stat().st_size
    assert len(meta.checksum) == 64 and meta.bad_rows["skipped"] == 0


def test_one_worker_and_two_give_the_same_rows_and_rerun_is_a_no_op(tmp_path, lines):
    raw = write_tsv(tmp_path / "day_0.tsv", lines)
    one = prepare(cfg(tmp_path, [raw], num_workers=1, dir=str(tmp_path / "a")), progress=False)
    two = prepare(cfg(tmp_path, [raw], dir=str(tmp_path / "b")), progress=False)
    for split in ("train", "eval"):
        a, b = read_split(one.directory, split), read_split(two.directory, split)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert one.metadata.fingerprint == two.metadata.fingerprint
    assert one.metadata.checksum == two.metadata.checksum  # the same parts, byte for byte
    for key in ("mean", "std"):  # merged across workers: the same to float64 rounding
        np.testing.assert_allclose(
            one.metadata.dense_stats[key], two.metadata.dense_stats[key], rtol=1e-12
        )
    stamp = (two.directory / "metadata.json").stat().st_mtime_ns
    again = prepare(cfg(tmp_path, [raw], dir=str(tmp_path / "b")), progress=False)
    assert again.up_to_date
    assert (two.directory / "metadata.json").stat().st_mtime_ns == stamp
    os.utime(raw, ns=(stamp + 10**9, stamp + 10**9))  # the input changed: prepare again
    redone = prepare(cfg(tmp_path, [raw], dir=str(tmp_path / "b")), progress=False)
    assert not redone.up_to_date and redone.metadata.fingerprint != two.metadata.fingerprint


def test_vocab_counts_train_rows_only(tmp_path):
    base = "\t".join(["1"] + ["1"] * NUM_INT + ["a"] * NUM_CAT)
    tail = "\t".join(["0"] + ["1"] * NUM_INT + ["b"] + ["a"] * (NUM_CAT - 1))
    rare = "\t".join(["0"] + ["1"] * NUM_INT + ["c", ""] + ["a"] * (NUM_CAT - 2))
    train = write_tsv(tmp_path / "train.tsv", [base] * 5 + [rare])
    evals = write_tsv(tmp_path / "eval.tsv", [tail, base, rare])
    c = cfg(tmp_path, [train], eval_raw=[str(evals)], mapping="vocab", min_count=2, table_rows=[0])
    meta = prepare(c, progress=False).metadata
    assert meta.features[0].num_embeddings == 3  # missing, OOV, "a"
    np.testing.assert_array_equal(read_split(Path(c.dir), "train")["ids"][:, 0], [2] * 5 + [1])
    eval_ids = read_split(Path(c.dir), "eval")["ids"]
    np.testing.assert_array_equal(eval_ids[:, 0], [1, 2, 1])  # "b" never seen in train: OOV
    np.testing.assert_array_equal(eval_ids[:, 1], [2, 2, 0])  # empty: the missing row
    assert np.load(Path(c.dir) / "vocab" / "cat_0.ids.npy").tolist() == [0xA]


@pytest.mark.parametrize(
    "bad, words",
    [
        ("\t".join(["1"] * 12), "day_0.tsv:3: 12 tab-separated fields, expected 40"),
        ("1\tx" + "\t" * 38, "day_0.tsv:3: integer field 2 (int_0) is 'x'"),
        ("1" + "\t" * 14 + "zz" + "\t" * 25, "day_0.tsv:3: categorical field 15 (cat_0) is 'zz'"),
    ],
)
def test_bad_row_names_file_and_line_and_leaves_nothing(tmp_path, lines, bad, words):
    raw = write_tsv(tmp_path / "day_0.tsv", [lines[0], lines[1], bad, *lines[2:50]])
    with pytest.raises(PrepareError, match=words.replace("(", r"\(").replace(")", r"\)")):
        prepare(cfg(tmp_path, [raw]), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day_0.tsv"]  # no dir, no temp dir


def test_skip_counts_bad_rows_in_metadata_and_keeps_the_old_dir_on_failure(tmp_path, lines):
    rows = [*lines[:20], "1\t2", lines[20], "nope" + "\t" * 39, *lines[21:40], lines[40][:30]]
    raw = write_tsv(tmp_path / "day_0.tsv", rows)
    raw.write_text(raw.read_text().rstrip("\n"))  # a truncated last line
    meta = prepare(cfg(tmp_path, [raw], on_bad_row="skip"), progress=False).metadata
    assert meta.bad_rows["skipped"] == 3
    assert meta.bad_rows["by_reason"] == {"wrong_number_of_fields": 2, "bad_label": 1}
    assert any("truncated last line" in e for e in meta.bad_rows["examples"])
    assert sum(s.num_rows for s in meta.splits.values()) == 40
    with pytest.raises(PrepareError, match="day_0.tsv:21: 2 tab-separated fields"):
        prepare(cfg(tmp_path, [raw]), progress=False)
    assert ShardMetadata.read(tmp_path / "out").fingerprint == meta.fingerprint


def test_empty_and_missing_files(tmp_path, lines):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(PrepareError, match=r"empty.tsv is empty"):
        prepare(cfg(tmp_path, [empty]), progress=False)
    with pytest.raises(PrepareError, match=r"data.raw: .*nothere.tsv does not exist"):
        prepare(cfg(tmp_path, [tmp_path / "nothere.tsv"]), progress=False)
    full = write_tsv(tmp_path / "day_0.tsv", lines[:30])
    meta = prepare(cfg(tmp_path, [empty, full], on_bad_row="skip"), progress=False).metadata
    assert meta.bad_rows["by_reason"] == {"empty_file": 1}
    # Criteo's day_N.gz as downloaded: named with the fix, not "line 1: 2 fields".
    import gzip

    packed = tmp_path / "day_1.gz"
    packed.write_bytes(gzip.compress("".join(lines[:30]).encode()))
    with pytest.raises(PrepareError, match=r"data.raw: .*day_1.gz is gzip-compressed .*gunzip"):
        prepare(cfg(tmp_path, [full, packed]), progress=False)


def test_cli_prepares_and_errors_in_one_line(tmp_path, lines, capsys):
    raw = write_tsv(tmp_path / "day_0.tsv", lines[:300])
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "trainer.prepare", "data=criteo", f"data.raw=[{raw}]"]
    args += [f"data.dir={out}", "data.num_workers=1", "data.table_rows=[100]"]
    done = run(args, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train 285 rows, eval 15 rows" in done.stdout
    assert ShardMetadata.read(out).features[0].num_embeddings == 100
    # The same entry point in this process (a second interpreter start is slow).
    assert cli_main(args[3:]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli_main([*args[3:4], f"data.raw=[{tmp_path / 'missing.tsv'}]", *args[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardrec: prepare error: data.raw: ")
    assert cli_main([*args[3:], "data.no_such_key=1"]) == 2
    assert capsys.readouterr().err.startswith("shardrec: config error: ")


def test_data_groups_compose_to_their_schemas(compose_cfg):
    from omegaconf import OmegaConf

    from trainer.data.data_configs import TableDataConfig

    criteo = OmegaConf.to_object(compose_cfg(["data=criteo", "data.dir=/x"]).data)
    assert isinstance(criteo, CriteoDataConfig) and criteo.table_rows[2] == 1_000_000
    table = OmegaConf.to_object(compose_cfg(["data=table", "data.label=y"]).data)
    assert isinstance(table, TableDataConfig) and table.label == "y"
    with pytest.raises(Exception, match="mapping"):
        compose_cfg(["data=criteo", "data.mapping=md5"])


def test_the_shard_source_reads_what_prepare_wrote(tmp_path, lines):
    from trainer.data.shards import ShardSource

    raw = write_tsv(tmp_path / "day_0.tsv", lines[:400])
    prepare(cfg(tmp_path, [raw], eval_fraction=0.25), progress=False)
    source = ShardSource(tmp_path / "out", seed=0, shuffle=False)
    assert [f.num_embeddings for f in source.features] == ROWS and source.num_dense == NUM_INT
    assert source.num_train_samples == 300 and source.num_eval_samples == 100
    batch = next(source.eval_batches(batch_size=8, rank=0, world_size=1))
    want = expected_arrays(lines[300:308])
    np.testing.assert_array_equal(batch.labels.numpy(), want["labels"])
    mean, std = train_stats(tmp_path / "out")
    dense = np.where(blank_dense(lines[300:308]), 0.0, (want["dense"] - mean) / std)
    np.testing.assert_allclose(batch.dense_features.numpy(), dense, rtol=1e-4, atol=1e-5)
    kjt = batch.sparse_features
    for f, name in enumerate(CAT_NAMES):
        np.testing.assert_array_equal(kjt[name].values().numpy(), want["ids"][:, f])


def test_never_replaces_a_directory_it_did_not_write(tmp_path, lines):
    raw = write_tsv(tmp_path / "day_0.tsv", lines[:30])
    keep = tmp_path / "out" / "precious.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    with pytest.raises(PrepareError, match="is not a prepared data directory"):
        prepare(cfg(tmp_path, [raw]), progress=False)
    assert keep.read_text() == "mine"


def test_dense_stats_are_numpys_over_the_train_rows_only(tmp_path, lines):
    """Per-column mean and std of the stored train dense (never eval), and the
    ShardSource standardizes eval batches with those train stats."""
    from trainer.data.shards import ShardSource

    raw = write_tsv(tmp_path / "day_0.tsv", lines)
    meta = prepare(cfg(tmp_path, [raw], eval_fraction=0.25), progress=False).metadata
    train = read_split(tmp_path / "out", "train")["dense"]
    missing = (train == 0) & np.signbit(train)  # an empty field is stored as -0.0
    np.testing.assert_array_equal(missing, blank_dense(lines[:1500]))
    assert 0.05 < missing.mean() < 0.15  # the lines blank 10% of the integer fields
    stats, (mean, std) = meta.dense_stats, train_stats(tmp_path / "out")
    assert stats["count"] == (~missing).sum(axis=0).tolist()
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-10)
    assert np.abs(mean - train.mean(axis=0)).max() > 0.1  # the blanks are not in the stats
    evaluation = read_split(tmp_path / "out", "eval")["dense"].astype(np.float64)
    everything = np.ma.masked_equal(np.concatenate([train, evaluation]), 0.0)
    assert np.abs(mean - everything.mean(axis=0)).max() > 1e-4  # nor the eval rows
    for norm in ("standardize", "none"):
        source = ShardSource(tmp_path / "out", seed=0, dense_norm=norm)
        batch = next(source.eval_batches(batch_size=8, rank=0, world_size=1))
        raw, blank = expected_arrays(lines[1500:1508])["dense"], blank_dense(lines[1500:1508])
        want = raw if norm == "none" else np.where(blank, 0.0, (raw - mean) / std)
        got = batch.dense_features.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert not np.signbit(got[got == 0]).any()  # no -0.0 reaches the model


def test_resume_accepts_other_chunking_refuses_other_rows(tmp_path, lines):
    """data.chunk_bytes cuts the same rows into other parts (another checksum): a
    checkpoint resumes; other table_rows (other rows) is refused."""
    from trainer.data.shards import ShardSource

    raw = write_tsv(tmp_path / "day_0.tsv", lines)
    small = prepare(cfg(tmp_path, [raw], dir=str(tmp_path / "a")), progress=False).metadata
    big = prepare(
        cfg(tmp_path, [raw], dir=str(tmp_path / "b"), chunk_bytes=1 << 20), progress=False
    ).metadata
    assert small.checksum != big.checksum  # other parts...
    for split in ("train", "eval"):  # ...the same rows
        a, b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    state = ShardSource(tmp_path / "a", seed=0).state_dict()
    ShardSource(tmp_path / "b", seed=0).load_state_dict(state)
    other = [r + 1 for r in ROWS]
    prepare(cfg(tmp_path, [raw], dir=str(tmp_path / "c"), table_rows=other), progress=False)
    with pytest.raises(ValueError, match="different prepare config"):
        ShardSource(tmp_path / "c", seed=0).load_state_dict(state)
