"""A 2-rank sharded distillation run with an int4-QAT student (torchrun in the slow tier).

One plan shards the teacher's and the student's tables; every eval reports both
heads; the export is the student alone and serves what the student's eval
computed; a checkpoint holds both models and a resumed run ends where an
uninterrupted one does; ``python -m trainer.export`` on the run's checkpoint
serves the same student, byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compression.bundle import load_program
from tests.conftest import REPO
from tests.distributed import fork_trainer, torchrun_trainer
from tests.processes import run

TINY = [
    "trainer=smoke",
    "trainer.num_steps=8",
    "trainer.eval_every_steps=4",
    "trainer.eval_batch_size=512",
    "trainer.plot=false",
    "data.num_eval_samples=2048",
    "data.num_dense=4",
    "data.cardinalities=[40,100,7,64]",
    "data.hotness=[1,3,1,2]",
    "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,1]",
    "distill=online",
    "distill.student_qat_bits=4",
    "distill.warmup_steps=2",
    "distill.alpha=0.3",
    "distill.temperature=2.0",
    "sharding=row_wise",
    "trainer.export=true",
]


@pytest.mark.dist
def test_two_rank_distillation_with_qat_student_exports_the_student(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fork_trainer(*TINY, "trainer.checkpoint_every_steps=8", run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    for head in ("teacher", "student"):
        assert 0.0 <= summary[f"{head}.auc"] <= 1.0
    assert summary["auc"] == summary["student.auc"]
    assert summary["distill"]["alpha"] == 0.3
    # The pair's step time (benchmarks/studies/distill.py sets it against teacher-alone runs).
    assert summary["step_time_s"] == pytest.approx(summary["train_time_s"] / 8)

    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    teacher = plan["teacher.sparse_arch.embedding_bag_collection"]
    student = plan["student.sparse_arch.embedding_bag_collection"]
    assert sorted(student) == [f"s_t_cat_{i}" for i in range(4)] and len(teacher) == 4
    assert {t["sharding_type"] for t in student.values()} == {"row_wise"}

    export = summary["export"]
    assert export["bits"] == {f"s_t_cat_{i}": 4 for i in range(4)}
    assert export["max_abs_logit_diff"] <= 1e-3
    # The served model is the student alone: its tables, at dim 4.
    assert (run_dir / export["path"] / "model.pt2").is_file()  # the serving bundle
    served = load_program(run_dir / export["path"] / "model.pt2")
    dims = served.tables.D_offsets.diff()
    assert len(dims) == 4 and set(dims.tolist()) == {4}

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "teacher.auc" in r]
    assert [r["step"] for r in evals] == [4, 8]

    # Offline, from the checkpoint (both models in it): the same student, the same numbers.
    offline_path = tmp_path / "offline"
    proc = run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            str(run_dir / "checkpoints" / "step_8"),
            "--out",
            str(offline_path),
        ],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert offline["step"] == 8 and offline["bits"] == export["bits"]
    assert offline["max_abs_logit_diff"] <= 1e-3
    assert offline["auc"] == pytest.approx(export["auc"], abs=1e-6)
    assert offline["bytes"] == export["bytes"]
    served_offline = load_program(offline_path / "model.pt2")
    for name, value in served.state_dict().items():
        assert torch.equal(served_offline.state_dict()[name], value), name


@pytest.mark.dist
@pytest.mark.slow
def test_distillation_resumes_where_it_left_off(tmp_path: Path) -> None:
    """Resume from step 4: both models and the warm-up counter come back."""
    run_dir = tmp_path / "run"
    torchrun_trainer(*TINY, "trainer.checkpoint_every_steps=4", run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = tmp_path / "resumed"
    step_4 = run_dir / "checkpoints" / "step_4"
    torchrun_trainer(*TINY, f"trainer.resume={step_4}", run_dir=resumed)
    again = json.loads((resumed / "summary.json").read_text())
    for key in ("student.auc", "teacher.auc", "student.logloss", "teacher.logloss"):
        assert again[key] == pytest.approx(summary[key], abs=1e-5), key
    assert torch.isfinite(torch.tensor(again["export"]["auc"]))


def _trainer(*overrides: str, run_dir: Path) -> dict:
    proc = run(
        [sys.executable, "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.dist
@pytest.mark.slow
def test_frozen_teacher_warm_started_from_a_plain_run_keeps_its_predictions(
    tmp_path: Path,
) -> None:
    """distill.teacher_checkpoint: the plain run's weights, resharded into the pair."""
    plain = [o for o in TINY if not o.startswith(("distill", "sharding", "trainer.export"))]
    first = _trainer(*plain, "trainer.checkpoint_every_steps=8", run_dir=tmp_path / "plain")
    step_8 = tmp_path / "plain" / "checkpoints" / "step_8"
    distilled = _trainer(
        *plain,
        "distill=online",
        f"distill.teacher_checkpoint={step_8}",
        "distill.freeze_teacher=true",
        run_dir=tmp_path / "distilled",
    )
    # Frozen: the teacher evaluates exactly as the plain run ended.
    assert distilled["teacher.auc"] == pytest.approx(first["auc"], abs=1e-6)
    assert distilled["teacher.logloss"] == pytest.approx(first["logloss"], abs=1e-6)
