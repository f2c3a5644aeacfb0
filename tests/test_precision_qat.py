"""Dense autocast and table QAT in one run (``precision.tables``, compression/precision.py).

``precision`` names the dense autocast dtype; the tables' storage follows it
unless table QAT is on, when every table keeps fp32 master rows. So
``precision=bf16 qat=int4 distill=online`` trains the dense layers in bf16 while
the QAT tables see their served values, and the export -- fp32 dense layers plus
the quantized tables, checked against an fp32-dense eval of the trained model with
fake-quantized tables (trainer/export/step.py) -- keeps max |logit diff| <= 1e-5.
Each run is compared with the same run in fp32 dense (its reference).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import DataType

from compression.precision import resolve_precision
from tests.distributed import fork_trainer, torchrun_trainer
from tests.test_precision import train_briefly
from trainer.config.schema import ConfigError, to_config
from trainer.config.validate import validate

PARITY = 1e-5  # fp32 dense on both sides of the export's check: only summation order differs

TINY = [
    "trainer=smoke",
    "trainer.num_steps=12",
    "trainer.eval_every_steps=6",
    "trainer.eval_batch_size=512",
    "trainer.progress_bar=false",
    "trainer.plot=false",
    "data.num_eval_samples=2048",
    "data.num_dense=4",
    "data.cardinalities=[40,100,7,64]",
    "data.hotness=[1,3,1,2]",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,1]",
    "qat=int4",
    "distill=online",
    "distill.warmup_steps=2",
    "trainer.export=true",
]


def test_table_storage_follows_qat_not_the_autocast() -> None:
    bf16 = resolve_precision("bf16", device_type="cuda", qat=True)
    assert bf16.autocast_dtype == torch.bfloat16 and bf16.table_data_type == DataType.FP32
    assert bf16.fused_params == {} and bf16.tables == "fp32"  # no stochastic rounding
    fp16 = resolve_precision("fp16", device_type="cuda", qat=True)
    assert fp16.autocast_dtype == torch.float16 and fp16.loss_scaling
    assert fp16.table_data_type == DataType.FP32
    # Without QAT, auto keeps precision's meaning (16-bit tables); explicit values win.
    assert resolve_precision("bf16", device_type="cuda").table_data_type == DataType.BF16
    assert resolve_precision("bf16", device_type="cuda", tables="fp32").tables == "fp32"
    fp32_dense = resolve_precision("fp32", device_type="cpu", tables="fp16")
    assert fp32_dense.autocast_dtype is None and fp32_dense.table_data_type == DataType.FP16
    assert resolve_precision("fp32", device_type="cuda", tables="bf16").tables == "bf16"
    assert resolve_precision("fp32", device_type="cpu", tables="bf16").tables == "fp16"
    assert resolve_precision("bf16", device_type="cpu", tables="fp32", qat=True).tables == "fp32"
    with pytest.raises(ValueError, match=r"precision.tables=fp16 with table QAT.*tables=auto"):
        resolve_precision("bf16", device_type="cpu", tables="fp16", qat=True)
    with pytest.raises(ValueError, match=r"precision.tables='int8'.*auto, fp32, bf16, fp16"):
        resolve_precision("bf16", device_type="cpu", tables="int8")


@pytest.mark.parametrize(
    "overrides",
    [
        ["qat=int4", "precision=bf16", "precision.tables=fp16"],
        ["qat=int8", "precision=fp32", "precision.tables=bf16"],
        ["distill=online", "distill.student_qat_bits=4", "precision.tables=fp16"],
    ],
)
def test_explicit_16bit_tables_with_qat_are_refused(compose_cfg, overrides: list[str]) -> None:
    cfg = to_config(compose_cfg(overrides))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    key = next(o for o in overrides if o.startswith("precision.tables"))
    assert key in str(err.value) and "precision.tables=auto" in str(err.value)


def test_unknown_table_precision_is_refused(compose_cfg) -> None:
    cfg = to_config(compose_cfg(["precision.tables=int8"]))
    with pytest.raises(ConfigError, match="precision.tables='int8'"):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["qat=int4", "precision=bf16"],
        ["qat=int4", "precision=fp16"],
        ["qat=int4", "precision=bf16", "distill=online"],
        ["qat=int4", "precision=bf16", "precision.tables=fp32"],
    ],
)
def test_autocast_with_qat_validates(compose_cfg, overrides: list[str]) -> None:
    validate(to_config(compose_cfg(overrides)))


def _train(precision: str, *, fp16_on_cpu: bool = False) -> dict:
    """A few in-process steps with int4 QAT (tests/test_precision.py's tiny run)."""
    return train_briefly(precision, qat_bits=4, fp16_on_cpu=fp16_on_cpu)


def test_bf16_dense_trains_on_fp32_qat_tables() -> None:
    """QAT's kernel check refuses 16-bit tables, so building at all shows fp32 rows."""
    fp32, bf16 = _train("fp32"), _train("bf16")
    assert bf16["dtype"] == torch.bfloat16 and fp32["dtype"] == torch.float32
    assert bf16["bytes"] == fp32["bytes"]  # fp32 master rows in both
    assert all(map(math.isfinite, bf16["losses"]))
    assert bf16["losses"][-1] < bf16["losses"][0]
    # The same fake-quantized tables; only the dense rounding differs.
    assert bf16["losses"] != fp32["losses"]
    assert abs(bf16["losses"][-1] - fp32["losses"][-1]) < 0.05


def test_fp16_dense_with_loss_scaling_trains_on_fp32_qat_tables() -> None:
    """fp16 autocast (CUDA's path, run on CPU): the loss scale's table boundary feeds
    fp32 QAT tables the unscaled gradient."""
    fp32, fp16 = _train("fp32"), _train("fp16", fp16_on_cpu=True)
    assert fp16["dtype"] == torch.float16 and fp16["loss_scaled"]
    assert fp16["bytes"] == fp32["bytes"]
    assert all(map(math.isfinite, fp16["losses"]))
    assert abs(fp16["losses"][-1] - fp32["losses"][-1]) < 0.05


def _run(*overrides: str, run_dir: Path) -> dict:
    fork_trainer(*overrides, run_dir=run_dir, nproc=1)  # python -m trainer, one process
    return _summary(run_dir)


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["losses"] = [r["train_loss"] for r in records if "train_loss" in r]
    return summary


def _check_against_reference(bf16: dict, fp32: dict) -> None:
    assert bf16["precision"] == "bf16" and bf16["table_precision"] == "fp32"
    assert fp32["table_precision"] == "fp32"
    assert bf16["embedding_bytes"] == fp32["embedding_bytes"]
    assert bf16["losses"] and all(map(math.isfinite, bf16["losses"]))
    for summary in (bf16, fp32):
        export = summary["export"]
        assert set(export["bits"].values()) == {4}
        assert export["dense_dtype"] == "fp32"
        assert export["max_abs_logit_diff"] <= PARITY
    assert bf16["export"]["train_autocast"] == "bf16"
    assert fp32["export"]["train_autocast"] == "fp32"
    # The served models differ only by the dense rounding during training.
    assert abs(bf16["export"]["auc"] - fp32["export"]["auc"]) < 0.05
    # Training's eval ran under autocast; the export's (fp32 dense) is close to it.
    assert abs(bf16["export"]["auc"] - bf16["auc"]) < 0.01


def test_bf16_qat_distill_trains_and_exports_with_parity(tmp_path: Path) -> None:
    bf16 = _run(*TINY, "precision=bf16", run_dir=tmp_path / "bf16")
    fp32 = _run(*TINY, "precision=fp32", run_dir=tmp_path / "fp32")
    _check_against_reference(bf16, fp32)
    # Both heads of the pair trained alike under bf16 dense compute.
    assert abs(bf16["student.auc"] - fp32["student.auc"]) < 0.05
    assert abs(bf16["teacher.auc"] - fp32["teacher.auc"]) < 0.05


@pytest.mark.slow  # the one-process bf16 + QAT + distillation run stays in make test
@pytest.mark.dist
def test_two_rank_bf16_qat_distill_exports_with_parity(tmp_path: Path) -> None:
    sharded = [*TINY, "sharding=row_wise"]
    torchrun_trainer(*sharded, "precision=bf16", run_dir=tmp_path / "bf16")
    torchrun_trainer(*sharded, "precision=fp32", run_dir=tmp_path / "fp32")
    bf16, fp32 = _summary(tmp_path / "bf16"), _summary(tmp_path / "fp32")
    assert bf16["world_size"] == 2
    _check_against_reference(bf16, fp32)
