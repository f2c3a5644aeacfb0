"""``data=table``: Parquet and text tables into shards, and MovieLens-100k on real bytes.

MovieLens-100k comes from the ``recbole==1.2.1`` wheel on PyPI (RecBole's
atomic files); the data is GroupLens's and not ours to redistribute, so the
session fetches it once into ``~/.cache/shardrec/ml-100k`` with
``pip download`` and the MovieLens tests skip, saying why, when PyPI cannot be
reached.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.data_configs import JoinConfig, TableDataConfig
from trainer.data.shard_format import ShardMetadata, offsets_file, values_file
from trainer.prepare import PrepareError, prepare

ML_CACHE = Path.home() / ".cache" / "shardrec" / "ml-100k"
ML_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def hashed(text: str | None, rows: int) -> int:
    return 0 if text in (None, "") else 1 + fnv1a64(text) % (rows - 1)


def read_split(directory: Path, split: str) -> dict:
    """Labels, dense and per feature the id lists of every row, the parts concatenated."""
    meta = ShardMetadata.read(directory)
    labels, dense, ids = [], [], {f.name: [] for f in meta.features}
    for part in meta.splits[split].parts:
        path = directory / part.path
        labels.append(np.load(path / "labels.npy"))
        dense.append(np.load(path / "dense.npy"))
        for name in ids:
            offsets = np.load(path / offsets_file(name))
            values = np.load(path / values_file(name)).tolist()
            ids[name] += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return {"labels": np.concatenate(labels), "dense": np.concatenate(dense), "ids": ids}


def events(n: int = 300) -> pa.Table:
    rng = np.random.default_rng(0)
    genres = [["a", "b"], [], None, ["c"], ["a", "", "c"]]
    return pa.table(
        {
            "clicked": pa.array(rng.integers(0, 2, n), pa.int8()),
            "price": pa.array([None if i % 7 == 0 else float(i) for i in range(n)]),
            "user": pa.array([int(u) for u in rng.integers(0, 40, n)], pa.int64()),
            "item": pa.array([None if i % 11 == 0 else f"item-{i % 23}" for i in range(n)]),
            "tags": pa.array([genres[i % 5] for i in range(n)], pa.list_(pa.string())),
        }
    )


def table_cfg(tmp_path: Path, raw: list[Path], **kw) -> TableDataConfig:
    base = dict(
        dir=str(tmp_path / "out"),
        label="clicked",
        dense=["price"],
        categorical=["user", "item"],
        multi_hot=["tags"],
        table_rows=[50],
        num_workers=1,
        eval_fraction=0.1,
    )
    return TableDataConfig(raw=[str(p) for p in raw], **{**base, **kw})


def test_parquet_rows_match_a_reference_and_split_in_two_files(tmp_path):
    table = events()
    pq.write_table(table.slice(0, 200), tmp_path / "a.parquet", row_group_size=64)
    pq.write_table(table.slice(200), tmp_path / "b.parquet")
    c = table_cfg(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], num_workers=2)
    meta = prepare(c, progress=False).metadata
    assert [f.name for f in meta.features] == ["user", "item", "tags"]
    assert meta.splits["train"].num_rows == 270 and meta.splits["eval"].num_rows == 30
    assert meta.features[2].max_ids_per_sample == 2
    rows = table.to_pylist()
    got = {**read_split(Path(c.dir), "train")}
    ev = read_split(Path(c.dir), "eval")
    got["labels"] = np.concatenate([got["labels"], ev["labels"]])
    got["dense"] = np.concatenate([got["dense"], ev["dense"]])
    for name in got["ids"]:
        got["ids"][name] += ev["ids"][name]
    np.testing.assert_array_equal(got["labels"], [r["clicked"] for r in rows])
    np.testing.assert_array_equal(got["dense"][:, 0], [r["price"] or 0.0 for r in rows])
    assert got["ids"]["user"] == [[hashed(str(r["user"]), 50)] for r in rows]
    assert got["ids"]["item"] == [[hashed(r["item"], 50)] for r in rows]
    want_tags = [[hashed(t, 50) for t in (r["tags"] or []) if t] for r in rows]
    assert got["ids"]["tags"] == want_tags


def test_csv_bad_values_named_or_skipped(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "clicked,price,user,item,tags\n"
        "1,2.5,7,x,a b\n"
        "0,nan,8,y,\n"
        "1,inf,9,z,c\n"
        "2,1,9,z,c\n"
        ",1,9,z,c\n"
        "0,abc,9,z,c\n"
        "0,,10,,c  d\n"
    )
    with pytest.raises(PrepareError, match=r"events.csv:3: column 'price' is 'nan', not a finite"):
        prepare(table_cfg(tmp_path, [path]), progress=False)
    meta = prepare(table_cfg(tmp_path, [path], on_bad_row="skip"), progress=False).metadata
    assert meta.bad_rows["by_reason"] == {"bad_dense": 3, "bad_label": 2}
    got = read_split(tmp_path / "out", "train")
    assert got["labels"].tolist() == [1.0]
    assert got["ids"]["tags"] == [[hashed("a", 50), hashed("b", 50)]]
    ev = read_split(tmp_path / "out", "eval")  # the last 10% of 7 rows: the last one
    assert ev["ids"]["item"] == [[0]] and ev["ids"]["tags"] == [[hashed("c", 50), hashed("d", 50)]]


def test_missing_column_and_missing_file_are_named(tmp_path):
    pq.write_table(events(), tmp_path / "a.parquet")
    with pytest.raises(PrepareError, match=r"a.parquet: no column 'country' \(it has clicked,"):
        prepare(table_cfg(tmp_path, [tmp_path / "a.parquet"], dense=["country"]), progress=False)
    with pytest.raises(PrepareError, match=r"data.raw: .*nope.parquet does not exist"):
        prepare(table_cfg(tmp_path, [tmp_path / "nope.parquet"]), progress=False)
    with pytest.raises(PrepareError, match="data.label is not set"):
        prepare(table_cfg(tmp_path, [tmp_path / "a.parquet"], label=""), progress=False)


@pytest.fixture(scope="session")
def movielens() -> Path:
    if all((ML_CACHE / name).is_file() for name in ML_FILES):
        return ML_CACHE
    download = ML_CACHE.parent / "recbole-wheel"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "recbole==1.2.1",
            "-d",
            str(download),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheels = list(download.glob("recbole-1.2.1-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(
            f"MovieLens-100k needs `pip download recbole==1.2.1` (PyPI unreachable?): "
            f"{done.stderr.strip().splitlines()[-1:]}"
        )
    ML_CACHE.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in ML_FILES:
            (ML_CACHE / name).write_bytes(wheel.read(f"recbole/dataset_example/ml-100k/{name}"))
    return ML_CACHE


def _atomic(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = [n.split(":")[0] for n in rows[0]]
    return [dict(zip(names, r)) for r in rows[1:]]


def test_movielens_100k_implicit_feedback(tmp_path, movielens, compose_cfg):
    from omegaconf import OmegaConf

    overrides = [
        "data=movielens",
        f"data.dir={tmp_path / 'ml'}",
        f"data.raw=[{movielens / 'ml-100k.inter'}]",
        "data.mapping=hash",
        "data.table_rows=[1000]",
    ]
    c: TableDataConfig = OmegaConf.to_object(compose_cfg(overrides).data)
    c.joins = [
        JoinConfig(raw=str(movielens / "ml-100k.user"), on="user_id"),
        JoinConfig(raw=str(movielens / "ml-100k.item"), on="item_id"),
    ]
    meta = prepare(c, progress=False).metadata
    names = ["user_id", "item_id", "occupation", "gender", "class", "age_bucket"]
    assert [f.name for f in meta.features] == names
    assert meta.splits["train"].num_rows == 90_000 and meta.splits["eval"].num_rows == 10_000
    inter = _atomic(movielens / "ml-100k.inter")
    users = {u["user_id"]: u for u in _atomic(movielens / "ml-100k.user")}
    items = {i["item_id"]: i for i in _atomic(movielens / "ml-100k.item")}
    got = read_split(Path(c.dir), "train")
    clicks = [float(float(r["rating"]) >= 4) for r in inter[:90_000]]
    np.testing.assert_array_equal(got["labels"], clicks)
    assert 0.5 < np.mean(clicks) < 0.6  # 55% of MovieLens ratings are 4 or 5
    bounds = [18, 25, 35, 45, 50, 56]
    for k in range(0, 90_000, 997):  # a sample of rows, checked field by field
        r = inter[k]
        user, item = users[r["user_id"]], items[r["item_id"]]
        assert got["ids"]["user_id"][k] == [hashed(r["user_id"], 1000)]
        assert got["ids"]["occupation"][k] == [hashed(user["occupation"], 1000)]
        assert got["ids"]["class"][k] == [hashed(g, 1000) for g in item["class"].split(" ") if g]
        age = int(user["age"])
        assert got["ids"]["age_bucket"][k] == [1 + sum(age >= b for b in bounds)]
        np.testing.assert_allclose(got["dense"][k, 0], np.log1p(age), rtol=1e-6)


def test_csv_with_a_utf8_byte_order_mark_finds_its_first_column(tmp_path):
    path = tmp_path / "excel.csv"  # a spreadsheet's "CSV UTF-8" export starts with a BOM
    path.write_text('clicked,user,title\n1,7,"a, b"\n0,8,c\n', encoding="utf-8-sig")
    c = table_cfg(tmp_path, [path], dense=[], categorical=["user", "title"], multi_hot=[])
    assert prepare(c, progress=False).metadata.splits["train"].num_rows == 2
    got = read_split(tmp_path / "out", "train")
    assert got["labels"].tolist() == [1.0, 0.0]
    assert got["ids"]["title"] == [[hashed("a, b", 50)], [hashed("c", 50)]]


def test_a_file_without_a_header_line_is_named_with_the_fix(tmp_path):
    """MovieLens' u.data (tab-separated, no header) and ratings.dat ('::' separators)."""
    udata, dat = tmp_path / "u.data", tmp_path / "ratings.dat"
    udata.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    dat.write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    kw = dict(label="rating", dense=[], categorical=["user_id", "item_id"], multi_hot=[])
    with pytest.raises(
        PrepareError, match=r"looks like a data row: add a header line naming"
    ) as err:
        prepare(table_cfg(tmp_path, [udata], format="tsv", **kw), progress=False)
    assert f"printf 'col1\\tcol2\\tcol3\\tcol4\\n'; cat {udata}; }} > " in str(err.value)
    with pytest.raises(PrepareError, match=r"'::' separators .*\(data.format=tsv\)") as err:
        prepare(table_cfg(tmp_path, [dat], format="tsv", **kw), progress=False)
    # The command the hint gives writes a file that prepares under the names it gave.
    command = str(err.value).split("e.g. `", 1)[1].split("`", 1)[0]
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    named = tmp_path / "ratings.named.tsv"
    assert named.read_text().splitlines()[:2] == ["col1\tcol2\tcol3\tcol4", "1\t1193\t5\t978300760"]
    cols = dict(label="col3", dense=[], categorical=["col1", "col2"], multi_hot=[])
    out = tmp_path / "from_hint"
    prepare(table_cfg(out, [named], label_threshold=3.5, eval_fraction=0.0, **cols), progress=False)
    assert read_split(out / "out", "train")["labels"].tolist() == [1.0, 0.0]  # 5 and 3 stars
    named = tmp_path / "named.tsv"  # a header whose names are not numbers: no hint
    named.write_text("user,item\n")
    with pytest.raises(
        PrepareError,
        match=r"no column 'rating' \(it has user,item\); fix data\.label .* buckets$",
    ):
        prepare(table_cfg(tmp_path, [named], format="tsv", **kw), progress=False)


def test_an_empty_text_file_is_named_or_skipped(tmp_path):
    good, empty = tmp_path / "good.csv", tmp_path / "empty.csv"
    good.write_text("clicked,user,item\n" + "".join(f"{i % 2},{i},x\n" for i in range(20)))
    empty.write_bytes(b"")  # 0 bytes: not even the header
    kw = dict(dense=[], categorical=["user", "item"], multi_hot=[])
    with pytest.raises(PrepareError, match=r"empty.csv is empty, not even a header line"):
        prepare(table_cfg(tmp_path, [good, empty], **kw), progress=False)
    c = table_cfg(tmp_path, [good, empty], on_bad_row="skip", **kw)
    meta = prepare(c, progress=False).metadata
    assert meta.splits["train"].num_rows + meta.splits["eval"].num_rows == 20
    with pytest.raises(PrepareError, match=r"every file is empty"):
        prepare(table_cfg(tmp_path, [empty], on_bad_row="skip", **kw), progress=False)


def test_compressed_text_and_a_file_that_is_not_parquet_are_named(tmp_path):
    import gzip

    gz = tmp_path / "events.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("clicked,user,item\n1,7,x\n0,8,y\n")
    kw = dict(dense=[], categorical=["user", "item"], multi_hot=[])
    with pytest.raises(PrepareError, match=r"events.csv.gz is gzip-compressed: decompress it"):
        prepare(table_cfg(tmp_path, [gz], **kw), progress=False)
    fake = tmp_path / "events.parquet"
    fake.write_text("clicked,user,item\n1,7,x\n")
    with pytest.raises(PrepareError, match=r"events.parquet: not a Parquet file \("):
        prepare(table_cfg(tmp_path, [fake], **kw), progress=False)


def test_parquet_columns_of_the_wrong_arrow_type_are_named(tmp_path):
    table = pa.table(
        {
            "clicked": pa.array([1, 0, 1], pa.int8()),
            "tags": pa.array([["a"], ["b", "c"], []], pa.list_(pa.string())),
            "meta": pa.array([{"x": 1}] * 3),
            "ts": pa.array([0, 1, 2], pa.timestamp("ms")),
            "city": pa.array(["1.5", "x", "2"]).dictionary_encode(),  # a pandas category
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    raw = [tmp_path / "t.parquet"]
    cases = [
        (
            dict(categorical=["tags"], multi_hot=[]),
            r"'tags' is list<.*>; name it in data.multi_hot",
        ),
        (dict(categorical=["meta"]), r"column 'meta' is struct<x: int64>; data.categorical needs"),
        (dict(dense=["meta"]), r"column 'meta' is struct<x: int64>; data.dense needs numbers"),
        (dict(label="ts"), r"column 'ts' is timestamp\[ms\]; data.label needs numbers"),
        (dict(dense=["city"]), r"t.parquet:2: column 'city' is 'x', not a finite number"),
    ]
    for over, match in cases:
        kw = {"dense": [], "categorical": [], "multi_hot": ["tags"], **over}
        with pytest.raises(PrepareError, match=match):
            prepare(table_cfg(tmp_path, raw, **kw), progress=False)
