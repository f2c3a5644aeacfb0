"""Checkpoints: a resumed run is the run that never stopped, and a checkpoint exports.

(a) Real 2-rank row-wise runs (gloo). Run A (ranks forked by ``fork_trainer``)
trains 8 steps, checkpointing every 4, and exports at the end
(``trainer.export=true``). Run B, new processes under ``torchrun`` in a new run
dir that holds A's ``step_4``, a save killed before its rename
(``.tmp-step_6``, complete otherwise) and a ``step_7`` without DCP's metadata,
resumes with ``trainer.resume=auto`` and trains steps 5-8. Measured:
B picks ``step_4``, and its ``metrics.jsonl`` (train losses, AUC, log loss)
and every tensor of its ``step_8`` checkpoint (tables, dense layers, the fused
row-wise Adagrad momentum, Adam's state, the step) equal A's, bit for bit.

(b) A's ``step_4`` resumed in one process (world size 1, the planner's plan,
per-rank batch 2 x 256 so the global batches are A's): DCP reshards it; the
step-8 losses, AUC and tensors agree to float noise (measured: 1.2e-7).

(c) ``python -m trainer.export`` on A's ``step_8`` (one process, no
torchrun) scores the same export as A's ``trainer.export=true`` (measured:
equal AUC, log loss, bytes and max |logit diff|).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.distributed import fork_trainer, torchrun_trainer
from tests.test_train_e2e import TINY
from trainer.checkpoint.load import (
    CONFIG_FILE,
    complete_checkpoints,
    resolve_resume,
    restore_records,
)
from trainer.config.saved import check_resumable
from trainer.config.schema import Config, ConfigError, to_config
from trainer.config.validate import validate
from trainer.data.synthetic_config import SyntheticDataConfig
from trainer.export.offline import main as export_main

CHECKPOINTED = [*TINY, "sharding=row_wise", "trainer.checkpoint_every_steps=4"]
# Resharded into one process, sums run in another order (measured: 1.2e-7).
RESHARD_ATOL = 1e-5
# The fp16 loss scaler's [scale, growth tracker]: the loss-scaling converter's state.
LOSS_SCALE_KEY = "compression.loss_scaling.scale_and_tracker"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run_a")
    fork_trainer(*CHECKPOINTED, "trainer.export=true", run_dir=run_dir)
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, full size, by flattened key."""
    out = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)

    def flat(tree: dict, prefix: str = "") -> dict:
        items: dict = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    return flat(torch.load(out))


def _touch_checkpoint(path: Path, *, metadata: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"")
    if metadata:
        (path / ".metadata").write_bytes(b"")
    (path / CONFIG_FILE).write_text(
        OmegaConf.to_yaml(OmegaConf.structured(Config(data=SyntheticDataConfig())))
    )
    return path


@pytest.mark.dist
def test_resume_auto_in_new_processes_equals_the_run_that_never_stopped(
    run_a: Path, tmp_path: Path
) -> None:
    a_ckpts = run_a / "checkpoints"
    assert [p.name for p in complete_checkpoints(a_ckpts)] == ["step_4", "step_8"]
    run_b = tmp_path / "run_b"
    b_ckpts = run_b / "checkpoints"
    shutil.copytree(a_ckpts / "step_4", b_ckpts / "step_4")
    # Killed between DCP's last write and the rename: complete files, temp name.
    shutil.copytree(a_ckpts / "step_8", b_ckpts / ".tmp-step_6")
    # A step dir without DCP's metadata (e.g. a copy that did not finish).
    (b_ckpts / "step_7").mkdir()
    shutil.copy(a_ckpts / "step_8" / "__0_0.distcp", b_ckpts / "step_7")
    shutil.copy(a_ckpts / "step_8" / CONFIG_FILE, b_ckpts / "step_7")
    # A died after step 4 had logged steps 5-8: resume drops them, then logs them anew.
    shutil.copy(run_a / "metrics.jsonl", run_b / "metrics.jsonl")

    proc = torchrun_trainer(
        *CHECKPOINTED, "trainer.resume=auto", "trainer.checkpoint_keep=1", run_dir=run_b
    )

    assert "checkpoints/step_4 at step 4" in proc.stdout + proc.stderr
    assert _records(run_b) == _records(run_a)  # losses, AUC, log loss: bit for bit
    a_final, b_final = (
        _tensors(a_ckpts / "step_8", tmp_path),
        _tensors(b_ckpts / "step_8", tmp_path),
    )
    assert a_final.keys() == b_final.keys()
    assert any(".momentum1" in k for k in a_final) and any("exp_avg_sq" in k for k in a_final)
    different = [k for k in a_final if not torch.equal(a_final[k], b_final[k])]
    assert not different, different[:5]
    summary = json.loads((run_b / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["auc"] == _records(run_a)[-1]["auc"]
    # keep=1 pruned step_4 and the stale temp dir; the foreign step_7 is left alone.
    assert sorted(p.name for p in b_ckpts.iterdir()) == ["step_7", "step_8"]


@pytest.mark.dist
def test_resume_into_one_process_reshards(run_a: Path, tmp_path: Path, compose_cfg) -> None:
    from trainer.train import train  # in this process: a world of one

    cfg = to_config(
        compose_cfg(
            [
                *TINY,
                "trainer.batch_size=512",  # 2 ranks x 256: the same global batches
                # Every table fused, as in the checkpoint (auto would make small tables
                # data_parallel on one CPU rank: a move the resume refuses).
                "sharding=table_wise",
                "trainer.eval_batch_size=1024",
                "trainer.checkpoint_every_steps=4",
                f"trainer.resume={run_a / 'checkpoints' / 'step_4'}",
                "trainer.progress_bar=false",
                "trainer.plot=false",
            ]
        )
    )
    summary = train(cfg, run_dir=tmp_path)
    want = _records(run_a)
    got = _records(tmp_path)
    assert [r["step"] for r in got] == [8, 8] and summary["world_size"] == 1
    assert abs(got[0]["train_loss"] - want[2]["train_loss"]) < RESHARD_ATOL
    assert abs(got[1]["auc"] - want[3]["auc"]) < RESHARD_ATOL
    a_final = _tensors(run_a / "checkpoints" / "step_8", tmp_path)
    one_final = _tensors(tmp_path / "checkpoints" / "step_8", tmp_path)
    assert a_final.keys() == one_final.keys()
    worst = max(float((a_final[k].float() - one_final[k].float()).abs().max()) for k in a_final)
    print(f"max |2 ranks - resumed in 1 process| over all tensors: {worst:.3g}")
    assert worst < RESHARD_ATOL


@pytest.mark.dist
def test_python_m_trainer_export_matches_the_runs_own_export(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` is what ``python -m trainer.export`` runs; called here to skip a start-up."""
    out = tmp_path / "served"
    export_main([str(run_a / "checkpoints" / "step_8"), "--out", str(out)])
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.with_suffix(".json").read_text()) == result
    want = json.loads((run_a / "summary.json").read_text())["export"]
    for key in ("auc", "logloss", "bytes", "fp32_bytes", "bits", "max_abs_logit_diff"):
        assert result[key] == want[key], key
    assert result["step"] == 8 and (out / "model.pt2").stat().st_size > result["bytes"]
    # Without QAT this is post-training quantization: serving moves the logits.
    assert result["max_abs_logit_diff"] > 0


@pytest.mark.dist
def test_python_m_trainer_export_re_exports_with_another_row_range(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--bits 2 --range mse``: the same checkpoint served with fitted row ranges."""
    results = {}
    for row_range in ("minmax", "mse"):
        out = tmp_path / row_range
        checkpoint = str(run_a / "checkpoints" / "step_8")
        export_main([checkpoint, "--bits", "2", "--range", row_range, "--out", str(out)])
        results[row_range] = json.loads(capsys.readouterr().out)
    for row_range, result in results.items():
        assert result["row_range"] == row_range
        assert set(result["bits"].values()) == {2}
    # Same bytes, other rows: the scale and bias of every row come from another range.
    assert results["mse"]["bytes"] == results["minmax"]["bytes"]
    assert results["mse"]["logloss"] != results["minmax"]["logloss"]


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (9, 10):
        _touch_checkpoint(ckpts / f"step_{step}")
    _touch_checkpoint(ckpts / ".tmp-step_11")  # save killed before the rename
    _touch_checkpoint(ckpts / "step_12", metadata=False)
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_9", "step_10"]
    assert resolve_resume("auto", run_dir=tmp_path) == ckpts / "step_10"
    assert resolve_resume("auto", run_dir=tmp_path / "fresh") is None
    assert resolve_resume(None, run_dir=tmp_path) is None
    with pytest.raises(ConfigError, match="trainer.resume.*step_12.*not a complete"):
        resolve_resume(str(ckpts / "step_12"), run_dir=tmp_path)


def test_restore_records_drops_what_comes_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (2, 4, 6)))
    assert [r["step"] for r in restore_records(path, step=4)] == [2, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert restore_records(tmp_path / "none.jsonl", step=4) == []


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("trainer.checkpoint_every_steps=-1", ["trainer.checkpoint_every_steps=-1", "0 turns"]),
        ("trainer.checkpoint_keep=0", ["trainer.checkpoint_keep=0", "checkpoint_every_steps=0"]),
        ("trainer.resume=/no/such/step_3", ["trainer.resume", "does not exist", "step_N"]),
    ],
)
def test_checkpoint_settings_are_validated(compose_cfg, override: str, names: list[str]) -> None:
    cfg = to_config(compose_cfg([override]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for name in names:
        assert name in str(err.value)


def test_resuming_another_model_names_the_keys(compose_cfg, tmp_path: Path) -> None:
    checkpoint = _touch_checkpoint(tmp_path / "step_5")
    check_resumable(checkpoint, Config(data=SyntheticDataConfig()))
    cfg = to_config(compose_cfg(["model.embedding_dim=32", "model.dense_arch_layer_sizes=[64,32]"]))
    with pytest.raises(ConfigError, match=r"model.embedding_dim: checkpoint 16, this run 32"):
        check_resumable(checkpoint, cfg)


def test_export_of_an_incomplete_checkpoint_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _touch_checkpoint(tmp_path / "step_3", metadata=False)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoint)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(checkpoint) in err and "not a complete checkpoint" in err and "step_N" in err


def test_fp16_loss_scale_survives_a_resume(compose_cfg, tmp_path: Path) -> None:
    """The GradScaler's state is in the checkpoint: its growth tracker keeps counting."""
    from trainer.train import train  # in this process: a world of one

    fp16 = [*TINY, "precision=fp16", "precision.fp16_on_cpu=true", "trainer.progress_bar=false"]
    fp16 += ["trainer.plot=false", "trainer.checkpoint_every_steps=4"]
    train(to_config(compose_cfg([*fp16, "trainer.num_steps=4"])), run_dir=tmp_path)
    first = _tensors(tmp_path / "checkpoints" / "step_4", tmp_path)[LOSS_SCALE_KEY]
    train(to_config(compose_cfg([*fp16, "trainer.resume=auto"])), run_dir=tmp_path)
    second = _tensors(tmp_path / "checkpoints" / "step_8", tmp_path)[LOSS_SCALE_KEY]
    # [scale, clean steps since the last change]: 4 clean steps, then 4 more (8, not 4).
    assert first.tolist() == [65536.0, 4.0]
    assert second.tolist() == [65536.0, 8.0]
