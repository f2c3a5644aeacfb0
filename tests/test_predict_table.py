"""``python -m trainer.predict`` on a ``data=table`` bundle: raw CSV rows, joined.

A planted click table (a dense column, a multi-hot text column, a user id
joined to a side table for its country) is prepared with ``eval_fraction``
(the eval split is the last rows, in order), a tiny ``qat=int4`` run exported
with the same ``data.*`` settings; predict then scores exactly those raw eval
rows through prepare's own reading, joining and mapping and reaches exactly
the export's AUC. A bad row is one error naming file:line, or skipped with
``on_bad_row=skip``; the side table's path can be replaced. A run given only
``data=table data.dir=DIR`` exports the same description from the settings
prepare recorded in metadata.json (as do partitions, cut by time or not), and
predict reaches that run's export AUC too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from trainer.config.schema import to_config
from trainer.data.data_configs import JoinConfig, TableDataConfig
from trainer.data.shard_format import ShardMetadata
from trainer.export.bundle import table_schema
from trainer.predict import PredictError, predict
from trainer.predict.__main__ import main
from trainer.prepare import prepare

NUM_ROWS, NUM_EVAL = 2048, 512


def _planted(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """events.csv (clicked, price, user, tags) and users.csv (user, country); the
    clicks follow the user's parity and tag ``a``. Returns the paths and the lines."""
    rng = np.random.default_rng(3)
    user = rng.integers(0, 40, NUM_ROWS)
    tags = [" ".join(rng.choice(list("abcde"), rng.integers(0, 3), replace=False)) for _ in user]
    price = rng.gamma(2.0, 3.0, NUM_ROWS)
    logit = np.where(user % 2 == 0, 1.5, -1.5) + np.array([1.0 if "a" in t else 0.0 for t in tags])
    clicked = rng.random(NUM_ROWS) < 1 / (1 + np.exp(-logit))
    lines = ["clicked,price,user,tags"]
    for i in range(NUM_ROWS):
        p = "" if i % 9 == 0 else f"{price[i]:.3f}"
        lines.append(f"{int(clicked[i])},{p},{user[i]},{tags[i]}")
    events = tmp_path / "events.csv"
    events.write_text("\n".join(lines) + "\n")
    users = tmp_path / "users.csv"
    users.write_text("user,country\n" + "".join(f"{u},c{u % 5}\n" for u in range(0, 40) if u != 7))
    return events, users, lines


def test_predict_raw_table_eval_rows_reaches_the_export_auc(
    tmp_path: Path, compose_cfg, capsys: pytest.CaptureFixture
) -> None:
    from trainer.train import train  # in this process: a world of one

    events, users, lines = _planted(tmp_path)
    shards = tmp_path / "shards"
    settings = dict(
        label="clicked",
        dense=["price"],
        dense_transform="log1p",
        categorical=["user", "country"],
        multi_hot=["tags"],
        table_rows=[64],
        eval_fraction=NUM_EVAL / NUM_ROWS,
    )
    cfg = TableDataConfig(
        raw=[str(events)],
        dir=str(shards),
        joins=[JoinConfig(raw=str(users), on="user")],
        num_workers=1,
        **settings,
    )
    meta = prepare(cfg, progress=False).metadata
    assert meta.splits["eval"].num_rows == NUM_EVAL  # the last NUM_EVAL rows of events.csv
    overrides = [
        "data=table",
        f"data.dir={shards}",
        f"data.raw=[{events}]",
        f"data.joins=[{{raw: '{users}', on: user}}]",
        "data.label=clicked",
        "data.dense=[price]",
        "data.dense_transform=log1p",
        "data.categorical=[user,country]",
        "data.multi_hot=[tags]",
        "data.table_rows=[64]",
        f"data.eval_fraction={NUM_EVAL / NUM_ROWS}",
        "trainer=smoke",
        "trainer.num_steps=8",
        "trainer.eval_every_steps=8",
        "trainer.eval_batch_size=256",
        "qat=int4",
        "trainer.export=true",
        "trainer.progress_bar=false",
        "trainer.plot=false",
    ]
    export = train(to_config(compose_cfg(overrides)), run_dir=tmp_path / "run")["export"]
    bundle = tmp_path / "run" / export["path"]
    schema = json.loads((bundle / "schema.json").read_text())
    table = schema["table"]
    assert schema["source"] == "table" and table is not None, schema.get("table_error")
    assert table["feature_order"] == ["user", "country", "tags"]
    assert table["label"] == {"column": "clicked", "threshold": None}
    assert table["dense"][0]["column"] == "price" and table["dense"][0]["transform"] == "log1p"
    assert table["dense"][0]["mean"] == meta.dense_stats["mean"][0]
    assert table["joins"][0]["on"] == "user" and table["joins"][0]["columns"] == [
        "user",
        "country",
    ]
    assert table["multi_hot"] == ["tags"] and table["list_separator"] == " "
    assert table["matches_prepare"] is True

    # The prepared eval split: the last NUM_EVAL raw rows, in order.
    eval_csv = tmp_path / "eval_rows.csv"
    eval_csv.write_text("\n".join([lines[0], *lines[-NUM_EVAL:]]) + "\n")
    out = tmp_path / "scores.parquet"
    capsys.readouterr()
    code = main([str(bundle), f"data.raw=[{eval_csv}]", f"out={out}", "progress=false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    scores = pq.read_table(out)
    assert scores.column_names == ["score", "label"] and scores.num_rows == NUM_EVAL
    assert result["rows"] == NUM_EVAL and result["skipped"] == 0
    print(f"predict auc {result['auc']}, export auc {export['auc']}")
    assert result["auc"] == export["auc"]  # the same rows through the same bundle

    # A bad row: one error naming file:line; skipped (and counted) on request, with
    # the side table's path replaced (its key taken from the schema).
    body = lines[-NUM_EVAL:]
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], *body[:3], "1,abc,3,a", *body[3:10]]) + "\n")
    moved = tmp_path / "moved_users.csv"
    moved.write_bytes(users.read_bytes())
    users.unlink()
    with pytest.raises(PredictError, match=f"{bad}:5: column 'price' is 'abc'.*on_bad_row=skip"):
        predict(
            bundle,
            raw=[str(bad)],
            out=tmp_path / "bad.parquet",
            progress=False,
            joins=[{"raw": str(moved)}],
        )
    got = predict(
        bundle,
        raw=[str(bad)],
        out=tmp_path / "bad.parquet",
        on_bad_row="skip",
        progress=False,
        joins=[{"raw": str(moved)}],
    )
    assert got["rows"] == 10 and got["skipped"] == 1
    got_scores = pq.read_table(tmp_path / "bad.parquet")["score"].to_pylist()
    # The same rows in a batch of 10, not 512: equal up to float summation order.
    np.testing.assert_allclose(got_scores, scores["score"].to_pylist()[:10], rtol=1e-5)

    # Rows without the label column are scored too: no label, no AUC.
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(
        "price,user,tags\n" + "".join(line.split(",", 1)[1] + "\n" for line in body[:10])
    )
    got = predict(
        bundle,
        raw=[str(unlabelled)],
        out=tmp_path / "u.parquet",
        progress=False,
        joins=[{"raw": str(moved)}],
    )
    assert got["auc"] is None and got["rows"] == 10
    unl = pq.read_table(tmp_path / "u.parquet")
    assert unl.column_names == ["score"] and unl["score"].to_pylist() == got_scores


def test_a_run_given_only_data_dir_exports_prepares_settings(
    tmp_path: Path, compose_cfg, capsys: pytest.CaptureFixture
) -> None:
    from trainer.train import train  # in this process: a world of one

    events, users, lines = _planted(tmp_path)
    shards = tmp_path / "shards"
    cfg = TableDataConfig(
        raw=[str(events)],
        dir=str(shards),
        joins=[JoinConfig(raw=str(users), on="user")],
        label="clicked",
        dense=["price"],
        dense_transform="log1p",
        categorical=["user", "country"],
        multi_hot=["tags"],
        buckets={"price": [2, 6]},
        table_rows=[64],
        eval_fraction=NUM_EVAL / NUM_ROWS,
        num_workers=1,
    )
    prepare(cfg, progress=False)
    overrides = [
        "data=table",
        f"data.dir={shards}",  # nothing else of data: prepare's metadata.json has it
        "trainer=smoke",
        "trainer.num_steps=8",
        "trainer.eval_every_steps=8",
        "trainer.eval_batch_size=256",
        "trainer.export=true",
        "trainer.progress_bar=false",
        "trainer.plot=false",
    ]
    export = train(to_config(compose_cfg(overrides)), run_dir=tmp_path / "run")["export"]
    bundle = tmp_path / "run" / export["path"]
    table = json.loads((bundle / "schema.json").read_text())["table"]
    assert table is not None
    assert (table["settings_from"], table["matches_prepare"]) == ("prepare", True)
    assert table["feature_order"] == ["user", "country", "tags", "price_bucket"]
    assert table["dense"][0]["transform"] == "log1p" and table["joins"][0]["on"] == "user"

    eval_csv = tmp_path / "eval_rows.csv"
    eval_csv.write_text("\n".join([lines[0], *lines[-NUM_EVAL:]]) + "\n")
    capsys.readouterr()
    out = tmp_path / "scores.parquet"
    code = main([str(bundle), f"data.raw=[{eval_csv}]", f"out={out}", "progress=false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["rows"] == NUM_EVAL and result["auc"] == export["auc"]

    # metadata.json written before prepare recorded its settings: null, and why; the
    # same prepare again records them (the shards stay up to date).
    meta = ShardMetadata.read(shards)
    meta.settings = {}
    meta.write(shards)
    run_data = to_config(compose_cfg(overrides)).data
    stats = {"norm": "standardize"}
    old = table_schema(run_data, ShardMetadata.read(shards), stats)
    assert old["table"] is None and "run the same prepare again" in old["table_error"]
    assert prepare(cfg, progress=False).up_to_date
    again = table_schema(run_data, ShardMetadata.read(shards), stats)["table"]
    assert (again["settings_from"], again["matches_prepare"]) == ("prepare", True)


def test_partitions_record_the_settings_their_bundles_describe(tmp_path: Path) -> None:
    """Follow mode's config names only the dataset: each partition's metadata.json
    describes its raw rows (a period of data.partition_by: the table as given)."""
    day = 86_400
    rows = [f"{1_796_083_200 + (i % 2) * day + i},{i % 2},{i % 5},{i}" for i in range(12)]
    events = tmp_path / "events.csv"
    events.write_text("ts,clicked,user,price\n" + "\n".join(rows) + "\n")
    common = dict(label="clicked", dense=["price"], categorical=["user"], table_rows=[8])
    follow = TableDataConfig(dir=str(tmp_path / "by_day"))  # data=table data.dir=DATASET
    by_day = TableDataConfig(
        raw=[str(events)],
        dir=follow.dir,
        format="csv",
        partition_by="day",
        timestamp_column="ts",
        eval_fraction=0.0,
        num_workers=1,
        **common,
    )
    named = TableDataConfig(
        raw=[str(events)], dir=str(tmp_path / "named"), partition="p0", num_workers=1, **common
    )
    days = prepare(by_day, progress=False).appended
    prepare(named, progress=False)
    assert days == ["2026-12-01", "2026-12-02"]
    for directory in [tmp_path / "by_day" / "partitions" / d for d in days] + [
        tmp_path / "named" / "partitions" / "p0"
    ]:
        meta = ShardMetadata.read(directory)
        table = table_schema(follow, meta, {"norm": "standardize"})["table"]
        assert table is not None, directory
        assert (table["settings_from"], table["matches_prepare"]) == ("prepare", True)
        assert table["columns"] == ["clicked", "price", "user"]
    assert meta.settings["partition"] == "p0"
    first = ShardMetadata.read(tmp_path / "by_day" / "partitions" / days[0])
    assert (first.settings["format"], first.settings["raw"]) == ("csv", [str(events)])


def test_cli_parses_joins_and_table_keys() -> None:
    from trainer.predict.__main__ import parse

    bundle, args = parse(
        ["b", "data.raw=[a.csv]", "out=o.parquet", "data.joins=[{raw: u.csv, on: user}]"]
        + ["data.format=csv", "data.batch_rows=128"]
    )
    assert bundle == Path("b") and args["raw"] == ["a.csv"]
    assert args["joins"] == [{"raw": "u.csv", "on": "user"}]
    assert args["format"] == "csv" and args["batch_rows"] == 128
    with pytest.raises(PredictError, match="data.joins"):
        parse(["b", "data.raw=[a.csv]", "out=o.parquet", "data.joins=u.csv"])


def test_a_compressed_input_is_one_predict_error(tmp_path) -> None:
    import gzip

    from trainer.predict.table import _labelled

    gz = tmp_path / "events.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("clicked,user\n1,7\n")
    with pytest.raises(PredictError, match=r"events.csv.gz is gzip-compressed"):
        _labelled(TableDataConfig(raw=[str(gz)], label="clicked", categorical=["user"]))
