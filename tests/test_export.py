"""The quantized serving export computes what QAT trained against, and reloads.

(a) One process: the tiny DLRM of the equivalence test, quantized with
``quantize_for_serving`` (int8, int4, and a mix with one table left fp32),
gives the logits and pooled embeddings of the same fp32 model whose quantized
tables hold ``fake_quantize_rows`` of their rows (measured: bit for bit), is
smaller, and a saved export reloads to the same logits.

(b) A real 2-rank row-wise int4 QAT run with ``trainer.export=true``: the
tables are packed where they are and meet on rank 0, and the bundle's program
scores the eval set as the sharded QAT model did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from compression.bundle import load_program, save_program, serving_program
from compression.serving import fake_quantize_tables, model_bytes, quantize_for_serving
from tests.conftest import REPO
from tests.distributed import fork_trainer
from tests.processes import run
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import tiny_config
from tests.test_train_e2e import TINY
from trainer.data import SyntheticCriteo, SyntheticDataConfig, eval_batches

TABLES = ["t_cat_0", "t_cat_1", "t_cat_2", "t_cat_3"]
# Serving's kernel reads scale * code + bias in fp32, as FBGEMM's dequantize op
# does, so the two paths differ only in summation order (measured: 0, bit for bit).
ATOL = 1e-6
# Quantization itself moves the untrained tiny model's pooled embeddings by
# about a quantization step (measured: 1e-3 int8, 1.6e-2 int4), its logits less.
MIN_POOLED_SHIFT = 1e-4
MIN_LOGIT_SHIFT = 1e-5
# case -> (bits per table, row range)
BITS_CASES = {
    "int8": (dict.fromkeys(TABLES, 8), "minmax"),
    "int4": (dict.fromkeys(TABLES, 4), "minmax"),
    "int4-int8-fp32": ({"t_cat_0": 4, "t_cat_1": 8, "t_cat_3": 4}, "minmax"),  # t_cat_2 fp32
    # Rows clamped to their fitted ranges (compression/row_range.py) before quantizing.
    "int2-int4-fp32-mse": ({"t_cat_0": 2, "t_cat_1": 4, "t_cat_3": 2}, "mse"),
}


def _logits_and_pooled(dlrm: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pooled = dlrm.sparse_arch(batch.sparse_features)
        return dlrm(batch.dense_features, batch.sparse_features).flatten(), pooled


@pytest.mark.parametrize("case", list(BITS_CASES))
def test_quantized_export_equals_fake_quantized_fp32(case: str, tmp_path: Path) -> None:
    bits, row_range = BITS_CASES[case]
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    dlrm = unsharded_model(cfg, device=torch.device("cpu")).model.eval()
    before = {k: v.clone() for k, v in dlrm.state_dict().items()}
    batch = SyntheticCriteo(cfg.data).batch("eval", 0, 256)

    served = quantize_for_serving(dlrm, table_bits=bits, row_range=row_range)
    served_logits, served_pooled = _logits_and_pooled(served, batch)
    fp32_logits, fp32_pooled = _logits_and_pooled(dlrm, batch)
    # The export works on a copy: the fp32 model is untouched.
    assert all(torch.equal(v, before[k]) for k, v in dlrm.state_dict().items())
    if row_range != "minmax":  # the range reached the export: other rows than min/max's
        minmax_pooled = _logits_and_pooled(quantize_for_serving(dlrm, table_bits=bits), batch)[1]
        assert (served_pooled - minmax_pooled).abs().max() > MIN_POOLED_SHIFT
    fake_quantize_tables(dlrm, table_bits=bits, row_range=row_range)
    want_logits, want_pooled = _logits_and_pooled(dlrm, batch)

    ebc = served.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, QuantEmbeddingBagCollection)
    served_types = {t.name: t.data_type.value for t in ebc.embedding_bag_configs()}
    assert served_types == {t: f"INT{bits[t]}" if t in bits else "FP32" for t in TABLES}
    # Quantization moved the outputs (by far more than the tolerance), and the
    # export moved them exactly as the fake-quantized rows do.
    assert (served_pooled - fp32_pooled).abs().max() > MIN_POOLED_SHIFT
    assert (served_logits - fp32_logits).abs().max() > MIN_LOGIT_SHIFT
    torch.testing.assert_close(served_pooled, want_pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(served_logits, want_logits, atol=ATOL, rtol=0)

    fp32_bytes, served_bytes = model_bytes(dlrm), model_bytes(served)
    # dim 8 tables: fp32 rows 32 B; int8 and int4 rows (codes + fp16 scale and
    # bias) padded to FBGEMM's 16 B row alignment; dense layers stay fp32.
    table_bytes = sum(
        t.num_embeddings * (16 if t.name in bits else 32) for t in ebc.embedding_bag_configs()
    )
    dense_bytes = sum(
        p.numel() * 4 for n, p in dlrm.named_parameters() if "embedding_bags" not in n
    )
    # FBGEMM also pads the one storage that holds all tables (measured: 80 B here).
    padding_bytes = served_bytes - table_bytes - dense_bytes - _small_buffer_bytes(served)
    assert 0 <= padding_bytes <= 64 * len(TABLES)
    assert served_bytes < fp32_bytes
    print(f"{case}: {fp32_bytes} -> {served_bytes} bytes ({fp32_bytes / served_bytes:.2f}x)")

    # The served program (no pickle: torch.export) reloads to the same scores.
    kjt = batch.sparse_features
    program = serving_program(served, feature_names=list(kjt.keys()))
    save_program(program, tmp_path / "model.pt2", num_dense=batch.dense_features.shape[1])
    reloaded = load_program(tmp_path / "model.pt2")
    scores = reloaded(batch.dense_features, kjt.values().long(), kjt.lengths().long())
    assert torch.equal(scores, torch.sigmoid(served_logits))
    assert reloaded.tables.weights.numel() == table_bytes


def _small_buffer_bytes(served: torch.nn.Module) -> int:
    """FBGEMM's and torchrec's bookkeeping buffers (offsets, cache state, ...)."""
    return sum(
        b.numel() * b.element_size()
        for n, b in served.named_buffers()
        if "embedding_bags" not in n and b.dtype != torch.float32
    )


def test_quantize_for_serving_names_bad_tables_and_bits() -> None:
    dlrm = unsharded_model(tiny_config("table_wise"), device=torch.device("cpu")).model
    with pytest.raises(ValueError, match="t_nope"):
        quantize_for_serving(dlrm, table_bits={"t_nope": 8})
    with pytest.raises(ValueError, match="t_cat_0.*=3"):
        quantize_for_serving(dlrm, table_bits={"t_cat_0": 3})


@pytest.mark.dist
@pytest.mark.parametrize(
    "sharding",
    [
        ["sharding=row_wise"],
        # Every table's columns split over both ranks: QAT all-reduces each row's
        # range, here the sums of its fitted range (compression/row_range.py).
        pytest.param(
            ["sharding=column_wise", "sharding.column_shard_dim=8", "qat.range=mse"],
            marks=pytest.mark.slow,  # a second 2-rank export: the slow tier
        ),
    ],
    ids=["row_wise", "column_wise-mse"],
)
def test_two_rank_qat_int4_export(tmp_path: Path, sharding: list[str]) -> None:
    fork_trainer(*sharding, "qat=int4", "trainer.export=true", *TINY, run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    if "sharding=column_wise" in sharding:
        plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
        tables = next(iter(plan.values()))
        assert all(t["ranks"] == [0, 1] for t in tables.values())
    export = summary["export"]
    assert export["bits"] == {f"t_cat_{i}": 4 for i in range(26)}
    assert export["row_range"] == ("mse" if "qat.range=mse" in sharding else "minmax")
    # Serving sees exactly the rows QAT trained and evaluated on (measured: 0).
    assert export["max_abs_logit_diff"] <= 1e-5
    # The tables gathered from both ranks score the eval set as the sharded
    # model did (measured: equal AUC and log loss).
    assert abs(export["auc"] - summary["auc"]) < 1e-4
    assert abs(export["logloss"] - summary["logloss"]) < 1e-5
    # dim 16: 64 B fp32 rows become 16 B int4 rows (8 B codes + 4 B scale/bias, aligned).
    assert export["fp32_bytes"] / export["bytes"] > 3.5
    # Packed rows, 16-byte aligned, no storage padding: exactly 4x.
    assert export["fp32_table_bytes"] / export["table_bytes"] == 4.0

    reloaded = load_program(tmp_path / "bundle" / "model.pt2")  # the served program
    assert reloaded.tables.weights.numel() == export["table_bytes"]
    print(f"export: {export['fp32_bytes']} -> {export['bytes']} bytes, auc {export['auc']:.4f}")
    source = SyntheticCriteo(SyntheticDataConfig(num_eval_samples=2048))
    logits, labels = [], []
    with torch.no_grad():
        for batch in eval_batches(source, batch_size=512, rank=0, world_size=1):
            kjt = batch.sparse_features
            logits.append(reloaded(batch.dense_features, kjt.values().long(), kjt.lengths().long()))
            labels.append(batch.labels.flatten())
    auc = binary_auroc(torch.cat(logits), torch.cat(labels).long())
    assert abs(float(auc) - export["auc"]) < 1e-6


@pytest.mark.slow  # the in-process export tests cover the PTQ error figure
@pytest.mark.dist
def test_python_m_trainer_ptq_export_shows_the_quantization_error(tmp_path: Path) -> None:
    """Without QAT, ``trainer.export_bits`` quantizes every table after training."""
    proc = run(
        [
            sys.executable,
            "-m",
            "trainer",
            "trainer.export=true",
            "trainer.export_bits=4",
            *TINY,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    export = summary["export"]
    assert export["bits"] == {f"t_cat_{i}": 4 for i in range(26)}
    # The fp32-trained model never saw int4 rows: serving moves its logits
    # (measured: 0.034 after 8 steps), which is what QAT removes.
    assert export["max_abs_logit_diff"] > 1e-3
    # ... but only a little: the int4 model scores the eval set as the trained one did
    # (measured after 8 steps: AUC 0.4990 vs 0.4996, log loss 0.4398 vs 0.4402).
    assert abs(export["auc"] - summary["auc"]) < 0.01
    assert abs(export["logloss"] - summary["logloss"]) < 0.01
    assert export["auc"] != summary["auc"]  # it did score the quantized model
    assert export["bytes"] < export["fp32_bytes"]
    assert (tmp_path / "bundle" / "model.pt2").stat().st_size > export["bytes"]
    assert not (tmp_path / "exported_model.pt").exists()  # nothing pickled
