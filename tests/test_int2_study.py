"""The int2 study: its sweep composes, and its script computes what QAT wins back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from trainer.config.schema import to_config
from trainer.config.validate import validate


def test_the_int2_study_sweep_composes_every_job(compose_cfg) -> None:  # noqa: ANN001
    params = OmegaConf.load(REPO / "conf" / "sweep" / "int2_study.yaml").hydra.sweeper.params
    experiments = str(params["experiment"]).split(",")
    assert str(params["trainer.seed"]).split(",") == ["0", "1", "2"]
    cfgs = {}
    for experiment in experiments:
        cfg = to_config(compose_cfg(["+sweep=int2_study", f"experiment={experiment}"]))
        validate(cfg)
        assert cfg.trainer.export
        cfgs[experiment.removeprefix("compression/")] = cfg
    assert cfgs["fp32_ptq2"].trainer.export_bits == cfgs["fp32_ptq2_mse"].trainer.export_bits == 2
    assert (cfgs["fp32_ptq2"].qat.range, cfgs["fp32_ptq2_mse"].qat.range) == ("minmax", "mse")
    assert cfgs["int2_qat"].qat.bits == 2
    # The small-table arms: the same rule in training (QAT) and after it (PTQ).
    for name in ("fp32_ptq2_small8", "int2_qat_small8"):
        assert (cfgs[name].qat.small_table_rows, cfgs[name].qat.small_table_bits) == (1000, 8)
    assert cfgs["int2_qat_small8"].qat.bits == 2
    # The distilled int2 student is the model itself (the teacher's own shape).
    kd = cfgs["int2_qat_distill"]
    assert kd.distill.name == "online" and kd.distill.student_qat_bits == 2
    assert kd.distill.embedding_dim == kd.model.embedding_dim
    assert kd.distill.dense_arch_layer_sizes == kd.model.dense_arch_layer_sizes
    assert kd.distill.over_arch_layer_sizes == kd.model.over_arch_layer_sizes


def _job(root: Path, experiment: str, seed: int, summary: dict) -> None:
    job = root / f"{experiment}{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=compression/{experiment}\n- trainer.seed={seed}\n"
    )
    (job / "summary.json").write_text(json.dumps(summary))


def test_study_script_reports_the_share_won_back(tmp_path: Path) -> None:
    from benchmarks.studies.int2 import main

    fp32 = [0.80, 0.81, 0.80]
    served = {  # AUC lost per seed: PTQ 0.009/0.006/0.003, QAT 0.003/0.003/0.003
        "fp32_ptq2": [0.791, 0.804, 0.797],
        "fp32_ptq2_mse": [0.795, 0.806, 0.798],
        "int2_qat": [0.797, 0.807, 0.797],
        "int2_qat_distill": [0.798, 0.808, 0.799],
    }
    for experiment, aucs in served.items():
        for seed, auc in enumerate(aucs):
            export = {"auc": auc, "logloss": 0.3, "max_abs_logit_diff": 0.0}
            summary = {"auc": fp32[seed], "logloss": 0.29, "export": export}
            _job(tmp_path, experiment, seed, summary)
    assert main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "int2_study.json").read_text())
    recovered = result["recovered"]
    # QAT loses 0.003 per seed against PTQ's mean 0.006: half won back, below 2/3.
    assert recovered["qat_vs_ptq"]["of_mean_loss"] == pytest.approx(0.5)
    assert recovered["qat_vs_ptq"]["per_seed"]["0"] == pytest.approx(1 - 0.003 / 0.009)
    assert result["qat_meets_target"] is False
    # Distilled: 0.002, 0.002, 0.001 lost -> 1 - (0.005 / 3) / 0.006.
    assert recovered["qat_kd_vs_ptq"]["of_mean_loss"] == pytest.approx(1 - 0.005 / 0.018)
    assert result["auc_lost"]["ptq_mse"]["1"] == pytest.approx(0.004)
    assert "int2 QAT wins back 50.0%" in (tmp_path / "int2_study.md").read_text()
    assert (tmp_path / "int2_study.png").stat().st_size > 1000
