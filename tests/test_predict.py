"""``python -m trainer.predict``: raw Criteo TSV rows through the serving bundle.

Planted clicks written as Criteo TSV (benchmarks/planted_to_tsv.py), prepared
(eval.tsv is the eval split, in order), a tiny ``qat=int4`` run exported; then
predict scores eval.tsv's raw lines with prepare's own parsing and mapping and
reaches exactly the export's AUC (the same rows, the same bundle). A bad line
is one error naming file:line, or skipped with ``on_bad_row=skip``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import planted_to_tsv
from trainer.config.schema import to_config
from trainer.data.data_configs import CriteoDataConfig
from trainer.predict import PredictError, predict
from trainer.predict.__main__ import main
from trainer.prepare import prepare


def test_predict_raw_eval_rows_reaches_the_export_auc(
    tmp_path: Path, compose_cfg, capsys: pytest.CaptureFixture
) -> None:
    from trainer.train import train  # in this process: a world of one

    info = planted_to_tsv.write_planted_tsv(
        tmp_path, num_train=2048, num_eval=1024, blank_fraction=0.05
    )
    shards = tmp_path / "shards"
    prepare(
        CriteoDataConfig(
            raw=[str(tmp_path / "train.tsv")],
            eval_raw=[str(tmp_path / "eval.tsv")],
            table_rows=info["table_rows"],
            dir=str(shards),
            num_workers=1,
        ),
        progress=False,
    )
    overrides = [
        "data=criteo",
        f"data.dir={shards}",
        "trainer=smoke",
        "trainer.num_steps=8",
        "trainer.eval_every_steps=8",
        "trainer.eval_batch_size=512",
        "qat=int4",
        "trainer.export=true",
        "trainer.progress_bar=false",
        "trainer.plot=false",
    ]
    export = train(to_config(compose_cfg(overrides)), run_dir=tmp_path / "run")["export"]
    bundle = tmp_path / "run" / export["path"]
    schema = json.loads((bundle / "schema.json").read_text())
    assert schema["source"] == "criteo" and schema["dense"]["norm"] == "standardize"
    assert len(schema["dense"]["mean"]) == 13 and schema["features"][0]["mapping"]["kind"] == "hash"

    out = tmp_path / "scores.parquet"
    capsys.readouterr()
    code = main(
        [str(bundle), f"data.raw=[{tmp_path / 'eval.tsv'}]", f"out={out}", "progress=false"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    table = pq.read_table(out)
    assert table.column_names == ["score", "label"] and table.num_rows == 1024
    assert result["rows"] == 1024 and result["skipped"] == 0
    print(f"predict auc {result['auc']}, export auc {export['auc']}")
    assert result["auc"] == export["auc"]  # the same rows through the same bundle

    # A bad line: one error naming file:line; skipped (and counted) on request.
    lines = (tmp_path / "eval.tsv").read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines[:3]) + "1\tnot a row\n" + "".join(lines[3:10]))
    with pytest.raises(PredictError, match=f"{bad}:4: .*on_bad_row=skip"):
        predict(bundle, raw=[str(bad)], out=tmp_path / "bad.parquet", progress=False)
    got = predict(
        bundle, raw=[str(bad)], out=tmp_path / "bad.parquet", on_bad_row="skip", progress=False
    )
    assert got["rows"] == 10 and got["skipped"] == 1
    # Scored in a batch of 10 instead of the whole file's: the same up to float32 sums.
    np.testing.assert_allclose(
        pq.read_table(tmp_path / "bad.parquet")["score"].to_pylist(),
        table["score"].to_pylist()[:10],
        atol=1e-6,
    )
    one = predict(bundle, raw=[str(bad)], out=tmp_path / "one.parquet", on_bad_row="skip",
                  progress=False, batch_size=9)  # fmt: skip
    assert one["rows"] == 10  # a last batch of one row (the program takes batches of 2 or more)


def test_predict_names_a_missing_bundle_and_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([str(tmp_path), "data.raw=[x.tsv]", "out=o.parquet"]) == 2
    assert "schema.json not found" in capsys.readouterr().err
    assert main([str(tmp_path), "rows=[x.tsv]"]) == 2
    assert "'rows=[x.tsv]'" in capsys.readouterr().err


def test_the_auc_of_rows_of_one_class_is_null_not_nan(tmp_path: Path) -> None:
    from trainer.predict import ScoreSink

    sink = ScoreSink(tmp_path / "s.parquet", labelled=True)  # one row, or all clicks
    sink.add(torch.tensor([0.3, 0.7]), np.array([1.0, 1.0]))
    sink.close_writer()
    result = sink.result(skipped=0)
    assert result["rows"] == 2 and result["auc"] is None
    json.loads(json.dumps(result), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
