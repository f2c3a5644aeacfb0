"""int2 tables: the QAT forward is what the int2 export serves, and what int2 rows cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compression.serving import fake_quantize_tables, quantize_for_serving, table_bytes
from tests.reference import synthetic_tables, unsharded_model
from tests.test_sharding_equivalence import tiny_config
from tests.test_train_e2e import TINY
from trainer.config.schema import ConfigError, to_config
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo


@torch.no_grad()
def test_int2_export_serves_the_fake_quantized_rows_exactly() -> None:
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu")).model.eval()
    bits = {f"t_cat_{i}": 2 for i in range(4)}
    served = quantize_for_serving(model, table_bits=bits)
    fake_quantize_tables(model, table_bits=bits)
    batch = next(
        iter(
            SyntheticCriteo(cfg.data).train_batches(
                batch_size=256, rank=0, world_size=1, first_step=0, num_steps=1
            )
        )
    )
    want = model(batch.dense_features, batch.sparse_features)
    got = served(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Four levels per row: a coarse format, not a no-op.
    weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight
    assert max(len(row.unique()) for row in weight) <= 4


def _bytes(dim: int, bits: int) -> int:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t", num_embeddings=1000, embedding_dim=dim, feature_names=["f"]
            )
        ],
        device=torch.device("cpu"),
    )
    # quantize_inference_model swaps child modules, so the collection needs a parent.
    return table_bytes(quantize_for_serving(nn.ModuleDict({"ebc": ebc}), table_bits={"t": bits}))


def test_int2_is_no_smaller_than_int4_at_dim_16_but_is_at_dim_128() -> None:
    # dim 16: codes 4 (int2) or 8 (int4) bytes + 4 of fp16 scale/bias, padded to 16.
    # (Plus a few hundred bytes of the kernel's per-table metadata.)
    assert _bytes(16, 2) == _bytes(16, 4) and _bytes(16, 2) // 1000 == 16
    # dim 128: 32 + 4 -> 48 bytes against 64 + 4 -> 80.
    assert _bytes(128, 2) // 1000 == 48 and _bytes(128, 4) // 1000 == 80


def test_qat_int2_composes_and_exports_at_2_bits(compose_cfg) -> None:  # noqa: ANN001
    cfg = to_config(compose_cfg(["qat=int2"]))
    assert set(synthetic_tables(cfg).export_bits.values()) == {2}


def test_qat_start_step_trains_fp32_first_then_serves_what_it_trained(
    tmp_path: Path, compose_cfg
) -> None:  # noqa: ANN001
    """``qat.start_step=4``: steps 1-4 are the fp32 run's; QAT from step 5; export parity."""
    from trainer.train import train  # in this process: a world of one

    def run(name: str, *overrides: str) -> list[dict]:
        cfg = to_config(
            compose_cfg([*TINY, "trainer.progress_bar=false", "trainer.plot=false", *overrides])
        )
        summary = train(cfg, run_dir=tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [summary] + [r for r in map(json.loads, lines) if "auc" in r]

    warm, *warm_evals = run("warm", "qat=int2", "qat.start_step=4", "trainer.export=true")
    _, *fp32_evals = run("fp32")
    assert [r["step"] for r in warm_evals] == [4, 8]
    assert warm_evals[0]["auc"] == fp32_evals[0]["auc"]  # not quantized yet
    assert warm_evals[1]["auc"] != fp32_evals[1]["auc"]
    assert warm["export"]["max_abs_logit_diff"] == 0.0  # QAT on at the end: served = eval
    assert warm["export"]["auc"] == pytest.approx(warm["auc"], abs=1e-6)


def test_qat_start_step_past_the_run_is_a_config_error(compose_cfg) -> None:  # noqa: ANN001
    cfg = to_config(compose_cfg([*TINY, "qat=int2", "qat.start_step=8"]))
    with pytest.raises(ConfigError, match="qat.start_step=8"):
        validate(cfg, features=cfg.data.features)


def test_compression_report_says_when_int2_is_no_smaller_than_int4(tmp_path: Path) -> None:
    from tests.test_compression_report import EXPORT, _job, _report

    base = {"auc": 0.75, "logloss": 0.38, "embedding_bytes": 300, "samples_per_sec": 1000.0}
    for sweep, int2_table_bytes in ((tmp_path / "d16", 80), (tmp_path / "d128", 48)):
        _job(sweep, 0, "fp32_ptq8", {**base, "export": EXPORT})
        _job(sweep, 1, "int4_qat", {**base, "export": EXPORT})
        int2 = {**EXPORT, "table_bytes": int2_table_bytes}
        _job(sweep, 2, "int2_qat", {**base, "export": int2})
        proc = _report(sweep)
        assert proc.returncode == 0, proc.stderr
    assert "no smaller than int4" in (tmp_path / "d16" / "compression.md").read_text()
    assert "no smaller" not in (tmp_path / "d128" / "compression.md").read_text()


# The default job's tables under 1000 rows (data/synthetic.yaml's cardinalities).
SMALL = {f"t_cat_{i}" for i in (1, 4, 5, 7, 8, 13, 16, 19, 21, 22, 24)}


@pytest.mark.parametrize(
    "overrides",
    [
        ["qat=int2"],  # QAT: trained and served at these bits
        ["trainer.export_bits=2"],  # post-training export
        # a distilled student's own tables (the teacher stays fp32)
        ["distill=online", "distill.student_qat_bits=2"],
    ],
    ids=["qat", "ptq", "distill-student"],
)
def test_tables_under_small_table_rows_take_small_table_bits(
    compose_cfg,  # noqa: ANN001
    overrides: list[str],
) -> None:
    cfg = to_config(compose_cfg([*overrides, "qat.small_table_rows=1000"]))
    validate(cfg, features=cfg.data.features)
    bits = synthetic_tables(cfg).export_bits
    assert len(bits) == 26
    assert {t.removeprefix("s_") for t, b in bits.items() if b == 8} == SMALL
    assert {b for t, b in bits.items() if t.removeprefix("s_") not in SMALL} == {2}
    # qat.table_bits still wins over the small-table rule.
    cfg = to_config(
        compose_cfg(["qat=int2", "qat.small_table_rows=1000", "+qat.table_bits={t_cat_8:4}"])
    )
    assert synthetic_tables(cfg).export_bits["t_cat_8"] == 4


def test_small_table_bits_must_be_a_served_format(compose_cfg) -> None:  # noqa: ANN001
    cfg = to_config(
        compose_cfg(["qat=int2", "qat.small_table_rows=1000", "qat.small_table_bits=3"])
    )
    with pytest.raises(ConfigError, match="qat.small_table_bits=3"):
        validate(cfg, features=cfg.data.features)
