"""A table cut into partitions by a timestamp column (trainer/prepare/partition_by_time.py).

Three UTC days interleaved in one Parquet file (and one CSV with ISO times)
become three partitions in time order, each holding exactly that day's rows in
file order; with ``mapping=vocab`` an id seen on day 0 keeps its row on day 2.
A later call with the file grown by a fourth day appends one partition; the
same rows again (in other files) are a no-op. A missing timestamp column, an unparseable
time and a late row (a day before the newest listed one, or other rows for a
listed day) are named with file, line and column, or skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from tests.test_prepare_table import hashed, read_split
from trainer.data.data_configs import TableDataConfig
from trainer.data.partitions import Manifest
from trainer.online.partition_stream import PartitionStream
from trainer.prepare import PrepareError, prepare
from trainer.prepare.__main__ import main as prepare_main

DAY_S = 86_400
DEC_1 = 1_796_083_200  # 2026-12-01T00:00:00Z
ROWS = 50
ONE_BATCH = dict(batch_size=8, rank=0, world_size=1, first_step=0, num_steps=1)


def days_table(days: list[int], n_per_day: int = 40, seed: int = 0) -> pa.Table:
    """Rows of ``days`` (days after 2026-12-01) interleaved in file order; users
    ``u0..u9`` on every day, ``d<day>-*`` only on theirs."""
    rng = np.random.default_rng(seed)
    day = np.repeat(days, n_per_day)
    rng.shuffle(day)
    n = day.size
    ts = DEC_1 + day * DAY_S + rng.integers(0, DAY_S, n)
    users = [
        f"u{rng.integers(10)}" if rng.random() < 0.5 else f"d{d}-{i % 5}" for i, d in enumerate(day)
    ]
    return pa.table(
        {
            "ts": pa.array(ts, pa.int64()),
            "clicked": pa.array(rng.integers(0, 2, n), pa.int8()),
            "price": pa.array(np.round(rng.random(n) * 10, 2)),
            "user": pa.array(users),
            "tags": pa.array([["a", "b"][: i % 3] for i in range(n)], pa.list_(pa.string())),
        }
    )


def cfg(dataset: Path, raw: list[Path], **kw) -> TableDataConfig:
    base = dict(
        dir=str(dataset),
        label="clicked",
        dense=["price"],
        categorical=["user"],
        multi_hot=["tags"],
        table_rows=[ROWS],
        eval_fraction=0.0,
        num_workers=1,
        partition_by="day",
        timestamp_column="ts",
    )
    return TableDataConfig(raw=[str(p) for p in raw], **{**base, **kw})


def rows_of_day(table: pa.Table, day: int) -> list[dict]:
    return [r for r in table.to_pylist() if (r["ts"] - DEC_1) // DAY_S == day]


def test_three_days_in_one_parquet_file_then_a_fourth(tmp_path: Path) -> None:
    table = days_table([0, 1, 2])
    pq.write_table(table, tmp_path / "events.parquet", row_group_size=32)
    dataset = tmp_path / "days"
    first = prepare(cfg(dataset, [tmp_path / "events.parquet"], batch_rows=50), progress=False)
    names = ["2026-12-01", "2026-12-02", "2026-12-03"]
    assert first.appended == names and not first.up_to_date
    manifest = Manifest.read(dataset)
    assert manifest.names == names
    for day, entry in enumerate(manifest.partitions):  # exactly the day's rows, in file order
        want = rows_of_day(table, day)
        got = read_split(dataset / entry.path, "train")
        assert entry.num_rows == {"train": len(want)}
        np.testing.assert_array_equal(got["labels"], [r["clicked"] for r in want])
        np.testing.assert_allclose(got["dense"][:, 0], [r["price"] for r in want])
        assert got["ids"]["user"] == [[hashed(r["user"], ROWS)] for r in want]
        assert got["ids"]["tags"] == [[hashed(t, ROWS) for t in r["tags"]] for r in want]
        assert [f.name for f in entry_features(dataset / entry.path)] == ["user", "tags"]
    # The file grown by a fourth day: one partition appended, the three listed untouched.
    day_3 = days_table([3], seed=1)
    pq.write_table(pa.concat_tables([table, day_3]), tmp_path / "grown.parquet")
    second = prepare(cfg(dataset, [tmp_path / "grown.parquet"]), progress=False)
    assert second.appended == ["2026-12-04"]
    assert Manifest.read(dataset).partitions[:3] == manifest.partitions
    # The same rows, each day's in one file, from other files: a no-op (the rows decide).
    pq.write_table(day_3, tmp_path / "day_3.parquet")
    raws = [tmp_path / "events.parquet", tmp_path / "day_3.parquet"]
    again = prepare(cfg(dataset, raws), progress=False)
    assert again.up_to_date and again.appended == []
    assert Manifest.read(dataset).names == [*names, "2026-12-04"]


def entry_features(directory: Path) -> list:
    from trainer.data.shard_format import ShardMetadata

    return ShardMetadata.read(directory).features


def test_vocab_rows_are_stable_across_days_from_a_csv(tmp_path: Path, capsys) -> None:
    table = days_table([0, 1, 2], seed=2)
    iso = pa.array(
        [f"{np.datetime64(int(t), 's')}Z" for t in table.column("ts").to_numpy()], pa.string()
    )
    csv_table = table.drop_columns(["tags"]).set_column(0, "ts", iso)
    pv.write_csv(csv_table, tmp_path / "events.csv")
    dataset = tmp_path / "days"
    argv = [
        "data=table",
        f"data.raw=[{tmp_path / 'events.csv'}]",
        f"data.dir={dataset}",
        "data.label=clicked",
        "data.categorical=[user]",
        "data.mapping=vocab",
        "data.min_count=1",
        "data.eval_fraction=0.1",
        "data.num_workers=1",
        "data.partition_by=day",
        "data.timestamp_column=ts",
    ]
    assert prepare_main(argv) == 0
    assert "appended 3 partitions (2026-12-01, 2026-12-02, 2026-12-03)" in capsys.readouterr().out
    manifest = Manifest.read(dataset)
    assert [p.vocab_version for p in manifest.partitions] == [0, 1, 2]
    rows_by_user: dict[str, int] = {}
    for day, entry in enumerate(manifest.partitions):
        want = rows_of_day(table, day)
        got = [
            u for s in ("train", "eval") for u in read_split(dataset / entry.path, s)["ids"]["user"]
        ]
        assert len(got) == len(want) and entry.num_rows == {"train": 36, "eval": 4}
        for row, r in zip(got, want):  # one row per user, the same on every day
            assert rows_by_user.setdefault(r["user"], row[0]) == row[0]
    assert len(set(rows_by_user.values())) == len(rows_by_user)  # no two users share a row
    # Follow mode's reader opens each day with the first day's tables.
    stream = PartitionStream(cfg(dataset, [], mapping="vocab", eval_fraction=0.1), seed=0)
    assert stream.refresh() == manifest.names
    for day in range(3):
        stream.open(day)
        stream.begin(start_step=0, end_step=1)
        assert stream.num_train_samples == 36
        batch = next(iter(stream.train_batches(**ONE_BATCH)))
        assert batch.sparse_features.keys() == ["user"]
    assert prepare_main(argv) == 0
    assert "up to date" in capsys.readouterr().out


def test_bad_times_and_late_rows_are_named_or_skipped(tmp_path: Path) -> None:
    table = days_table([0, 1, 2], n_per_day=10, seed=3)
    pq.write_table(table, tmp_path / "events.parquet")
    dataset = tmp_path / "days"
    with pytest.raises(PrepareError, match=r"events.parquet: no column 'when' for data.timestamp"):
        prepare(cfg(dataset, [tmp_path / "events.parquet"], timestamp_column="when"))
    with pytest.raises(PrepareError, match=r"timestamp_column=ts is also in data.dense"):
        prepare(cfg(dataset, [tmp_path / "events.parquet"], dense=["ts"]))
    text = tmp_path / "events.csv"
    text.write_text("ts,clicked,price,user\n2026-12-01T10:00:00Z,1,1,a\nyesterday,0,2,b\n")
    with pytest.raises(PrepareError, match=r"events.csv:3: column 'ts' is 'yesterday', not a time"):
        prepare(cfg(dataset, [text], multi_hot=[]), progress=False)
    prepare(cfg(dataset, [tmp_path / "events.parquet"]), progress=False)
    before = (dataset / "manifest.json").read_text()
    # A day before the newest listed one that is not listed: late; so are other rows for a
    # listed day. Nothing is appended, not even the new day in the same call.
    late = tmp_path / "late.csv"
    late.write_text(
        "ts,clicked,price,user,tags\n"
        f"{DEC_1 + 3 * DAY_S},1,1,a,a b\n"
        f"{DEC_1 - 5},0,2,b,\n"
        f"{DEC_1 + 2 * DAY_S + 7},1,3,c,b\n"
    )
    with pytest.raises(PrepareError, match=r"late.csv:3: column 'ts' puts the row in 2026-11-30"):
        prepare(cfg(dataset, [late]), progress=False)
    with pytest.raises(PrepareError, match=r"settings: data.multi_hot=\[\]"):
        prepare(cfg(dataset, [late], multi_hot=[]), progress=False)  # the dataset's settings
    late.write_text(late.read_text().replace(f"{DEC_1 - 5}", f"{DEC_1 + 3 * DAY_S + 5}"))
    both = [tmp_path / "events.parquet", late]
    with pytest.raises(
        PrepareError, match=r"the rows of 2026-12-03 .* are not those of the listed"
    ):
        prepare(cfg(dataset, both), progress=False)
    assert (dataset / "manifest.json").read_text() == before
    skipped = prepare(cfg(dataset, both, on_bad_row="skip"), progress=False)
    assert skipped.appended == ["2026-12-04"]
    assert skipped.skipped["by_reason"] == {"late_row": 11}  # day 2's 10 rows and the late one
    assert skipped.metadata.splits["train"].num_rows == 2
    assert skipped.metadata.bad_rows["skipped"] == 11


def test_hours_from_arrow_timestamps_with_a_zone(tmp_path: Path) -> None:
    paris = pa.timestamp("ms", tz="Europe/Paris")
    # 14:30 and 15:10 in Paris are 13:30 and 14:10 UTC; a naive timestamp is UTC.
    stamps = [(DEC_1 + h * 3600 + m * 60) * 1000 for h, m in ((13, 30), (14, 10), (13, 50))]
    table = pa.table(
        {
            "at": pa.array(stamps, paris),
            "clicked": pa.array([1, 0, 1], pa.int8()),
            "user": pa.array(["a", "b", "c"]),
        }
    )
    pq.write_table(table, tmp_path / "events.parquet")
    result = prepare(
        cfg(
            tmp_path / "hours",
            [tmp_path / "events.parquet"],
            dense=[],
            multi_hot=[],
            partition_by="hour",
            timestamp_column="at",
        ),
        progress=False,
    )
    assert result.appended == ["2026-12-01T13", "2026-12-01T14"]
    first = read_split(tmp_path / "hours" / "partitions" / "2026-12-01T13", "train")
    assert first["ids"]["user"] == [[hashed("a", ROWS)], [hashed("c", ROWS)]]


def test_times_in_another_unit_than_timestamp_unit_are_bad_times(tmp_path: Path) -> None:
    """Milliseconds (or nanoseconds) read as seconds are past the year 9999: a bad time
    named with its line, not an OverflowError or an int64 product wrapped into 1970-2100."""
    table = days_table([0, 1], n_per_day=5)
    for scale, name in ((1000, "ms"), (10**9, "ns")):
        ts = pc.multiply(table["ts"], pa.scalar(scale, pa.int64()))
        pq.write_table(table.set_column(0, "ts", ts), tmp_path / f"{name}.parquet")
        with pytest.raises(PrepareError, match=rf"{name}.parquet:1: column 'ts' is \d+, not a"):
            prepare(cfg(tmp_path / name, [tmp_path / f"{name}.parquet"]), progress=False)
        right = prepare(cfg(tmp_path / name, [tmp_path / f"{name}.parquet"], timestamp_unit=name))
        assert right.appended == ["2026-12-01", "2026-12-02"]


def test_avazu_hours_need_a_timestamp_format_and_get_one(tmp_path: Path, capsys) -> None:
    """Avazu's ``hour`` column (YYMMDDHH as an integer, 14102100) is a time only in
    data.timestamp_format=%y%m%d%H; read as seconds since 1970 every row falls on one
    day of 1970, which prepare notes with the fix."""
    hours = [14102100, 14102101, 14102123, 14102200, 14102201]
    table = pa.table(
        {
            "hour": pa.array(np.repeat(hours, 4), pa.int64()),
            "click": pa.array(np.tile([0, 1], 10), pa.int8()),
            "site_id": pa.array([f"s{i % 3}" for i in range(20)]),
        }
    )
    pq.write_table(table, tmp_path / "avazu.parquet")
    argv = [
        "data=table",
        f"data.raw=[{tmp_path / 'avazu.parquet'}]",
        "data.label=click",
        "data.dense=[]",
        "data.categorical=[site_id]",
        "data.num_workers=1",
        "data.eval_fraction=0.0",
        "data.partition_by=hour",
        "data.timestamp_column=hour",
    ]
    assert prepare_main([*argv, f"data.dir={tmp_path / 'as_seconds'}"]) == 0
    out = capsys.readouterr()
    assert "appended 1 partition (1970-06-13T" in out.out
    assert "data.timestamp_format=%y%m%d%H" in out.err
    dataset = tmp_path / "hours"
    formatted = [*argv, f"data.dir={dataset}", "data.timestamp_format=%y%m%d%H"]
    assert prepare_main(formatted) == 0
    out = capsys.readouterr()
    names = ["2014-10-21T00", "2014-10-21T01", "2014-10-21T23", "2014-10-22T00", "2014-10-22T01"]
    assert f"appended 5 partitions ({', '.join(names)})" in out.out and "note" not in out.err
    assert Manifest.read(dataset).names == names
    assert [p.num_rows["train"] for p in Manifest.read(dataset).partitions] == [4] * 5
    # The same hours as text (a CSV's), and a value the format cannot read: a bad time.
    rows = table.set_column(0, "hour", pc.cast(table["hour"], pa.string())).to_pylist()
    rows[5]["hour"] = "2014-10-21"
    pv.write_csv(pa.Table.from_pylist(rows), tmp_path / "avazu.csv")
    csv_argv = [a.replace("avazu.parquet", "avazu.csv") for a in formatted]
    csv_argv = [a.replace(str(dataset), str(tmp_path / "csv_hours")) for a in csv_argv]
    assert prepare_main(csv_argv) == 2
    assert "avazu.csv:7: column 'hour' is '2014-10-21', not a timestamp" in capsys.readouterr().err
    assert prepare_main([*csv_argv, "data.on_bad_row=skip"]) == 0
    assert Manifest.read(tmp_path / "csv_hours").names == names
    with pytest.raises(PrepareError, match="has no % directive"):
        prepare(cfg(tmp_path / "x", [tmp_path / "avazu.parquet"], timestamp_format="YYMMDDHH"))
