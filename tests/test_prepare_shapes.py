"""Every table can be prepared and trained: no dense column, no multi-hot column,
a single categorical column; and a worker's error reaches the user as one line.

Issue 21: an all-categorical table (as several public CTR sets are) failed in
the writer on the zero-width dense block, and with several workers that error
was hidden behind a second traceback from the pool's clean-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.distributed import fork_trainer
from tests.processes import run
from tests.test_prepare_criteo import criteo_lines, write_tsv
from tests.test_prepare_table import events, hashed, read_split, table_cfg
from trainer.data.data_configs import CriteoDataConfig
from trainer.data.shard_format import ShardMetadata
from trainer.data.shards import ShardSource
from trainer.prepare import PrepareError, prepare
from trainer.prepare.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
BARS = ("table:", "criteo:")  # tqdm's progress lines on stderr


def _write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=64)
    else:
        delimiter = "\t" if path.suffix == ".tsv" else ","
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter=delimiter, quoting_style="none"))
    return path


def _flat_events(n: int = 300) -> pa.Table:
    """``events()`` without its list column (text formats hold scalars)."""
    return events(n).drop_columns(["tags"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv"])
def test_all_categorical_table_in_two_files_and_two_workers(tmp_path: Path, suffix: str) -> None:
    table = _flat_events()
    files = [_write(table.slice(0, 170), tmp_path / f"a{suffix}")]
    files.append(_write(table.slice(170), tmp_path / f"b{suffix}"))
    c = table_cfg(tmp_path, files, dense=[], multi_hot=[], num_workers=2)
    meta = prepare(c, progress=False).metadata
    assert meta.num_dense == 0 and meta.dense_names == []
    assert [f.name for f in meta.features] == ["user", "item"]
    assert meta.dense_stats == {"count": [], "mean": [], "std": []}
    train, ev = read_split(Path(c.dir), "train"), read_split(Path(c.dir), "eval")
    assert train["dense"].shape == (270, 0) and ev["dense"].shape == (30, 0)
    rows = table.to_pylist()
    labels = np.concatenate([train["labels"], ev["labels"]])
    np.testing.assert_array_equal(labels, [r["clicked"] for r in rows])
    users = train["ids"]["user"] + ev["ids"]["user"]
    items = train["ids"]["item"] + ev["ids"]["item"]
    assert users == [[hashed(str(r["user"]), 50)] for r in rows]
    assert items == [[hashed(r["item"], 50)] for r in rows]
    # The reader hands the model a [B, 0] dense tensor.
    source = ShardSource(Path(c.dir), seed=0, shuffle=True)
    batch = next(
        source.train_batches(batch_size=64, rank=0, world_size=1, first_step=0, num_steps=1)
    )
    assert tuple(batch.dense_features.shape) == (64, 0)
    assert batch.sparse_features.keys() == ["user", "item"]


@pytest.mark.parametrize(
    "columns",
    [
        dict(dense=[], categorical=["user"], multi_hot=[]),  # a single categorical column
        dict(dense=[], categorical=[], multi_hot=["tags"]),  # a single multi-hot column
        dict(dense=[], categorical=["item"], multi_hot=["tags"]),
        dict(dense=["price"], categorical=["user"], multi_hot=[]),  # no multi-hot
        dict(dense=["price"], categorical=[], multi_hot=["tags"]),
    ],
    ids=["one_cat", "one_multi_hot", "cat_multi_hot", "dense_one_cat", "dense_multi_hot"],
)
def test_column_combinations(tmp_path: Path, columns: dict) -> None:
    table = events()
    files = [_write(table.slice(0, 150), tmp_path / "a.parquet")]
    files.append(_write(table.slice(150), tmp_path / "b.parquet"))
    c = table_cfg(tmp_path, files, num_workers=2, **columns)
    meta = prepare(c, progress=False).metadata
    names = [*columns["categorical"], *columns["multi_hot"]]
    assert [f.name for f in meta.features] == names
    assert meta.num_dense == len(columns["dense"])
    got = read_split(Path(c.dir), "train")
    assert got["dense"].shape == (270, len(columns["dense"]))
    rows = table.to_pylist()[:270]
    if "tags" in names:
        assert got["ids"]["tags"] == [[hashed(t, 50) for t in (r["tags"] or []) if t] for r in rows]
    if "user" in names:
        assert got["ids"]["user"] == [[hashed(str(r["user"]), 50)] for r in rows]
    source = ShardSource(Path(c.dir), seed=0, shuffle=False)
    batch = next(source.eval_batches(batch_size=30, rank=0, world_size=1))
    assert tuple(batch.dense_features.shape) == (30, len(columns["dense"]))


def test_only_empty_bags(tmp_path: Path) -> None:
    """A multi-hot column whose every bag is empty: zero-length id files."""
    n = 40
    table = pa.table(
        {
            "clicked": pa.array([i % 2 for i in range(n)], pa.int8()),
            "tags": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
        }
    )
    c = table_cfg(
        tmp_path,
        [_write(table, tmp_path / "a.parquet")],
        dense=[],
        categorical=[],
        multi_hot=["tags"],
    )
    meta = prepare(c, progress=False).metadata
    assert meta.features[0].ids_per_sample == 0.0
    assert read_split(Path(c.dir), "train")["ids"]["tags"] == [[]] * 36
    batch = next(ShardSource(Path(c.dir), seed=0).eval_batches(batch_size=4, rank=0, world_size=1))
    assert batch.sparse_features.values().numel() == 0


def _planted(n: int, seed: int, *, noise_column: bool) -> pa.Table:
    """Clicks driven by the user alone: half the users click 90% of the time, the others 10%."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 200, n)
    clicks = rng.random(n) < np.where(user % 2 == 0, 0.9, 0.1)
    data = {"clicked": pa.array(clicks.astype(np.int8)), "user": pa.array(user)}
    if noise_column:
        data["item"] = pa.array([f"i{v}" for v in rng.integers(0, 50, n)])
    return pa.table(data)


def _train(data_dir: Path, run_dir: Path, *overrides: str) -> dict:
    """``python -m trainer data=table`` on the prepared table, one process."""
    fork_trainer(
        "data=table", f"data.dir={data_dir}", "trainer=smoke", *overrides, run_dir=run_dir, nproc=1
    )
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(
    "categorical,arch",
    [
        pytest.param(["user", "item"], "dlrm", id="two_columns"),
        # The other two shapes train the same code path: the slow tier keeps them.
        pytest.param(["user"], "dlrm", id="one_column", marks=pytest.mark.slow),
        pytest.param(["user", "item"], "dlrm_dcnv2", id="dcnv2", marks=pytest.mark.slow),
    ],
)
def test_training_without_dense_learns_the_planted_signal(
    tmp_path: Path, categorical: list[str], arch: str
) -> None:
    table = _planted(6000, seed=1, noise_column=len(categorical) > 1)
    c = table_cfg(
        tmp_path,
        [_write(table, tmp_path / "a.parquet")],
        dense=[],
        categorical=categorical,
        multi_hot=[],
        table_rows=[1000],
        eval_fraction=0.2,
    )
    assert prepare(c, progress=False).metadata.num_dense == 0
    summary = _train(
        Path(c.dir),
        tmp_path / "run",
        f"model={arch}",
        "trainer.num_steps=60",
        "trainer.eval_every_steps=60",
        "optim.dense_lr=0.01",
    )
    assert summary["steps"] == 60
    # The oracle's AUC is 0.9 (0.9 vs 0.1 by user); a model that ignores the ids: 0.5.
    assert summary["auc"] > 0.8, summary


def _bad_second_file(tmp_path: Path) -> list[Path]:
    lines = ["clicked,user,item"] + [f"{i % 2},{i % 13},i{i % 7}" for i in range(60)]
    files = []
    for k in range(4):
        body = list(lines)
        if k == 1:
            body[26] = "1,7"  # file line 27: a field short
        path = tmp_path / f"part{k}.csv"
        path.write_text("\n".join(body) + "\n")
        files.append(path)
    return files


def _error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bars (each redraw is a \\r-separated segment)."""
    segments = [s.strip() for line in stderr.splitlines() for s in line.split("\r")]
    return [s for s in segments if s and not s.startswith(BARS)]


def test_worker_error_is_one_line_with_several_workers(tmp_path: Path) -> None:
    files = _bad_second_file(tmp_path)
    args = [sys.executable, "-m", "trainer.prepare", "data=table"]
    args += [f"data.raw=[{','.join(map(str, files))}]", f"data.dir={tmp_path / 'out'}"]
    args += ["data.label=clicked", "data.categorical=[user,item]", "data.num_workers=4"]
    done = run(args, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "NoneType" not in done.stderr, done.stderr
    err = _error_lines(done.stderr)
    assert len(err) == 1, done.stderr
    assert err[0].startswith(f"shardrec: prepare error: {files[1]}:27: "), err
    assert "data.on_bad_row=skip" in err[0]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_criteo_worker_error_in_the_second_range_is_one_line(tmp_path: Path, capfd) -> None:
    lines = criteo_lines(600)
    bad_line = 450  # well past the first ~20 kB range
    lines[bad_line - 1] = "1\t2"
    raw = write_tsv(tmp_path / "day_0.tsv", lines)
    c = CriteoDataConfig(raw=[str(raw)], dir=str(tmp_path / "out"), chunk_bytes=20_000)
    assert raw.stat().st_size > 3 * c.chunk_bytes  # several ranges
    args = ["data=criteo", f"data.raw=[{raw}]", f"data.dir={c.dir}", "data.num_workers=4"]
    assert cli_main([*args, f"data.chunk_bytes={c.chunk_bytes}"]) == 2
    out = capfd.readouterr()
    assert "Traceback" not in out.err and "NoneType" not in out.err, out.err
    err = _error_lines(out.err)
    assert err == [err[0]] and err[0].startswith(
        f"shardrec: prepare error: {raw}:{bad_line}: 2 tab-separated fields"
    ), out.err
    assert not Path(c.dir).exists()


def test_metadata_of_an_all_categorical_table_round_trips(tmp_path: Path) -> None:
    c = table_cfg(
        tmp_path,
        [_write(_flat_events(), tmp_path / "a.csv")],
        dense=[],
        categorical=["user"],
        multi_hot=[],
    )
    prepare(c, progress=False)
    meta = ShardMetadata.read(Path(c.dir))
    assert meta.num_dense == 0 and len(meta.features) == 1
    assert prepare(c, progress=False).up_to_date


def test_text_row_with_the_wrong_number_of_fields_is_named_or_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = ["1,7,x", "0,8,y", "1,9", "0,9,z", "1,9,z", "2,9,z", "0,9,z", "1,2,3,4", "0,1,q"]
    path.write_text("clicked,user,item\n" + "\n".join(rows) + "\n")
    kw = dict(dense=[], multi_hot=[], eval_fraction=0.0)
    with pytest.raises(PrepareError, match=r"events.csv:4: 2 fields, expected 3 as in the header"):
        prepare(table_cfg(tmp_path, [path], **kw), progress=False)
    meta = prepare(table_cfg(tmp_path, [path], on_bad_row="skip", **kw), progress=False).metadata
    assert meta.bad_rows["by_reason"] == {"wrong_number_of_fields": 2, "bad_label": 1}
    # The label 2 is on line 7: numbered past the skipped line 4.
    assert [e.split(": ")[0].rsplit("/", 1)[1] for e in meta.bad_rows["examples"]] == [
        "events.csv:4",
        "events.csv:7",
        "events.csv:9",
    ]
    assert read_split(tmp_path / "out", "train")["labels"].tolist() == [1, 0, 0, 1, 0, 0]
    # A malformed last line, after the last good row.
    path.write_text("clicked,user,item\n1,7,x\n0,8,y\n1\n")
    with pytest.raises(PrepareError, match=r"events.csv:4: 1 fields, expected 3"):
        prepare(table_cfg(tmp_path, [path], **kw), progress=False)
