"""The streamed export at any size: shards packed where they are equal one process's export.

A 2-rank row-wise int4 QAT run exports at its end (each rank packs its own row
shards, the packed rows meet on rank 0 one table at a time); ``python -m
trainer.export`` then exports its last checkpoint in one process (one table at
a time from DCP). The two bundles' programs hold the same packed tables, byte
for byte, and give sample.pt the same scores. ``pack_rows`` of a row range is
that range of the whole table's packed rows, and both equal torchrec's TBE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from compression.bundle import load_program, tbe_tables
from compression.serving import pack_rows, quantize_for_serving
from tests.distributed import fork_trainer
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import tiny_config
from tests.test_train_e2e import TINY
from trainer.export.offline import main as export_main


@pytest.mark.parametrize("bits,row_range", [(8, "minmax"), (4, "minmax"), (2, "mse"), (None, "")])
def test_pack_rows_of_a_shard_are_the_tables_rows(bits: int | None, row_range: str) -> None:
    torch.manual_seed(0)
    dlrm = unsharded_model(tiny_config("table_wise"), device=torch.device("cpu")).model
    table_bits = {"t_cat_1": bits} if bits else {}
    served = quantize_for_serving(dlrm, table_bits=table_bits, row_range=row_range or "minmax")
    ebc = next(m for m in served.modules() if isinstance(m, QuantEmbeddingBagCollection))
    want = tbe_tables(ebc)[0]["t_cat_1"].rows
    rows = dlrm.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight
    kwargs = {"bits": bits, "row_range": row_range or "minmax"}
    assert torch.equal(pack_rows(rows, **kwargs), want)
    top, bottom = pack_rows(rows[:37], **kwargs), pack_rows(rows[37:], **kwargs)
    assert torch.equal(torch.cat([top, bottom]), want)


@pytest.mark.dist
def test_two_rank_row_wise_export_equals_one_process_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    fork_trainer(
        *TINY,
        "sharding=row_wise",
        "qat=int4",
        "trainer.export=true",
        "trainer.checkpoint_every_steps=8",
        run_dir=run,
    )
    export = json.loads((run / "summary.json").read_text())["export"]
    assert export["streamed"] and export["path"] == "bundle"
    assert not (run / "exported_model.pt").exists()
    one = tmp_path / "one"
    export_main([str(run / "checkpoints" / "step_8"), "--out", str(one)])
    offline = json.loads(capsys.readouterr().out)
    assert offline["streamed"] and offline["step"] == 8
    for key in ("auc", "logloss", "bytes", "table_bytes", "max_abs_logit_diff"):
        assert offline[key] == export[key], key

    sharded, single = load_program(run / "bundle" / "model.pt2"), load_program(one / "model.pt2")
    buffers = dict(sharded.tables.named_buffers())
    assert buffers.keys() == dict(single.tables.named_buffers()).keys()
    for name, value in single.tables.named_buffers():
        assert torch.equal(buffers[name], value), name  # the packed rows, byte for byte
    assert buffers["weights"].numel() == export["table_bytes"]
    a = torch.load(run / "bundle" / "sample.pt", weights_only=True)
    b = torch.load(one / "sample.pt", weights_only=True)
    assert torch.equal(a["scores"], b["scores"])
    assert torch.equal(sharded(a["dense"], a["ids"], a["lengths"]), a["scores"])
