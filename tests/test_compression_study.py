"""The compression study: every arm composes and validates, and the report finds the
Pareto front, the best hand-picked config per budget and the chooser's gap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.studies.compression_study import ARMS, BASE, CHOOSER, job_command, main
from trainer.config.schema import to_config
from trainer.config.validate import validate

CARDS = [1000, 1000]  # 2000 rows x dim 64 x 4 B = 512,000 fp32 table bytes
FP32 = 2000 * 64 * 4


def test_every_arm_composes_and_validates(compose_cfg) -> None:  # noqa: ANN001
    for arm, (_, overrides) in ARMS.items():
        cmd = job_command(arm, 1, 500, Path("/tmp/x"))
        assert cmd[-1] == "hydra.run.dir=/tmp/x" and "trainer.seed=1" in cmd
        cfg = to_config(compose_cfg([*BASE, "trainer.num_steps=500", *overrides]))
        validate(cfg)
        assert cfg.trainer.export and cfg.model.embedding_dim == 64, arm
        assert cfg.budget.ratio == CHOOSER.get(arm, 0.0), arm


def _job(root: Path, arm: str, seed: int, summary: dict) -> None:
    job = root / arm / f"s{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- trainer.seed={seed}\n")
    config = {"data": {"cardinalities": CARDS}, "model": {"embedding_dim": 64}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "summary.json").write_text(json.dumps(summary))


def _export(auc: float, table_bytes: int, remap: int = 0) -> dict:
    """An export entry; dense layers 1000 B; ``remap``: a pruned model's id map (not a
    table in ``table_bytes``, but served beside the tables)."""
    return {
        "auc": auc,
        "bytes": table_bytes + remap + 1000,
        "fp32_bytes": FP32 + 1000,
        "table_bytes": table_bytes,
        "fp32_table_bytes": FP32,
    }


def test_report_front_targets_and_chooser(tmp_path: Path) -> None:
    runs = {  # arm: per seed (served AUC, served table bytes)
        "qr_int8": [(0.797, FP32 // 25), (0.799, FP32 // 25)],  # 1/25: best at 1/20
        "int2": [(0.799, FP32 // 8)],  # 1/8: fits no target budget
        "qr1k_int2": [(0.790, FP32 // 60)],  # 1/60: the only one at 1/50, 0.010 below fp32
        "rank8_int4": [(0.780, FP32 // 16)],  # dominated by qr_int8
        "budget_20x": [(0.7975, FP32 // 22)],  # 0.0005 below qr_int8 at more bytes...
        "budget_50x": [(0.788, FP32 // 70)],  # ...nothing hand-picked is this small
    }
    for seed, auc in enumerate([0.800, 0.800]):
        _job(tmp_path, "fp32", seed, {"auc": auc, "export": _export(0.7995, FP32 // 3)})
    for arm, per_seed in runs.items():
        for seed, (auc, size) in enumerate(per_seed):
            _job(tmp_path, arm, seed, {"auc": auc + 0.001, "export": _export(auc, size)})
    # Pruned to 1/100 of the rows, but its id map (8 B per original row: 1/32) counts.
    _job(tmp_path, "int2_prune", 0, {"auc": 0.8, "export": _export(0.7975, FP32 // 100, 16000)})
    (tmp_path / "int4" / "s0" / ".hydra").mkdir(parents=True)  # a failed job
    (tmp_path / "int4" / "s0" / ".hydra" / "overrides.yaml").write_text("- qat=int4\n")

    assert main(["report", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compression_study.json").read_text())
    rows = result["rows"]
    assert rows["fp32"]["ratio"] == 1.0 and rows["ptq_int8"]["ratio"] == pytest.approx(
        1 / 3, rel=1e-4
    )
    assert rows["qr_int8"]["auc"]["mean"] == pytest.approx(0.798)
    assert rows["qr_int8"]["auc"]["n"] == 2
    assert rows["qr_int8"]["served_bytes"] == FP32 // 25 + 1000
    assert rows["int2_prune"]["ratio"] == pytest.approx(1 / 100 + 1 / 32, rel=1e-3)
    front = {n for n, r in rows.items() if r["pareto"]}
    assert front == {"fp32", "ptq_int8", "int2", "qr_int8", "qr1k_int2", "budget_50x"}
    t20, t50 = result["targets"]["budgets"]
    # The chooser is not hand-picked: qr_int8 is the best at 1/20 (0.002 below fp32).
    assert (t20["best"], t20["met"]) == ("qr_int8", True)
    assert t20["gap"] == pytest.approx(0.002)
    assert (t50["best"], t50["met"]) == ("qr1k_int2", False)
    chooser = {c["arm"]: c for c in result["targets"]["chooser"]}
    # budget_20x (1/22) is compared with hand-picked points of no more bytes: qr_int8 (1/25).
    assert chooser["budget_20x"]["best"] == "qr_int8" and chooser["budget_20x"]["fits"]
    assert chooser["budget_20x"]["gap"] == pytest.approx(0.0005)
    assert chooser["budget_20x"]["met"] is True
    assert chooser["budget_50x"]["best"] is None and chooser["budget_50x"]["met"] is None
    assert [f["job"] for f in result["failed"]] == ["int4/s0"]
    text = (tmp_path / "compression_study.md").read_text()
    assert "| QR mul (>= 10k rows), int8 QAT | 21,480 |" in text and "missed" in text
    assert (tmp_path / "compression_study.png").stat().st_size > 1000


def test_report_reads_table_rows_and_adds_a_prior(tmp_path: Path) -> None:
    """A table data set's rows come from its metadata.json; ``--prior`` adds an earlier
    report's seeds (runs whose directories were not kept)."""
    data = tmp_path / "data"
    data.mkdir()
    features = [{"name": f"t{i}", "num_embeddings": n} for i, n in enumerate(CARDS)]
    (data / "metadata.json").write_text(json.dumps({"features": features}))
    study = tmp_path / "study"
    for arm, auc, size in [("fp32", 0.78, FP32 // 3), ("budget_20x", 0.77, FP32 // 21)]:
        _job(study, arm, 1, {"auc": auc, "export": _export(auc, size)})
        config = {"data": {"dir": str(data)}, "model": {"embedding_dim": 64}}
        (study / arm / "s1" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    earlier = {
        "label": "chooser, budget 1/20",
        "chooser": True,
        "auc": {"values": [0.775]},
        "table_bytes": FP32 // 19,
        "served_bytes": FP32 // 19 + 1000,
        "ratio": 1 / 19,
    }
    prior = {"rows": {"budget_20x": earlier}}
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    assert main(["report", str(study), "--prior", str(tmp_path / "prior.json")]) == 0
    rows = json.loads((study / "compression_study.json").read_text())["rows"]
    assert rows["fp32"]["ratio"] == 1.0  # 2000 rows x 64 x 4 from metadata.json
    assert rows["budget_20x"]["auc"]["values"] == [0.775, 0.77]
    assert rows["budget_20x"]["ratio"] == pytest.approx((1 / 19 + 1 / 21) / 2, rel=1e-3)
