"""Checkpoints that are cheap and safe.

- An async save (``dcp.async_save`` on a snapshot) holds exactly the state of
  its step although training goes on while it is written: every tensor of
  ``step_4`` and ``step_8`` equals the synchronous run's, bit for bit.
- Disk full, for real: the run directory is a 22 MiB tmpfs (``mount -t
  tmpfs``; skipped where mounting is not permitted). ``step_4`` (14.6 MB)
  fits, ``step_8`` does not: the save fails with ENOSPC, ``step_4`` stays
  whole and loadable, no temp dir is left, and the run either trains on with
  a warning (``on_checkpoint_error=warn``) or stops naming the step and the
  checkpoint that is whole (``stop``).
- A checkpoint with a non-tensor entry (which DCP's loader would unpickle) is refused.
- A rank that raises while the other waits in a collective ends the whole job
  within a bounded time (torchrun's 30 s grace), with that rank's error shown.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tests.test_checkpoint import _tensors
from tests.test_faults_kill import torchrun
from tests.test_train_e2e import TINY
from trainer.checkpoint.load import CONFIG_FILE, complete_checkpoints, load_unsharded_model
from trainer.checkpoint.save import CheckpointSaveError
from trainer.config.schema import ConfigError, to_config

RUN = [*TINY, "trainer.checkpoint_every_steps=4", "trainer.progress_bar=false"]
RUN += ["trainer.plot=false"]


def _train(compose_cfg, overrides: list[str], run_dir: Path) -> dict:
    from trainer.train import train  # in this process: a world of one

    return train(to_config(compose_cfg([*RUN, *overrides])), run_dir=run_dir)


def test_an_async_save_holds_exactly_its_steps_state(compose_cfg, tmp_path: Path) -> None:
    sync = _train(compose_cfg, ["trainer.async_checkpoint=false"], tmp_path / "sync")
    asyn = _train(compose_cfg, ["trainer.async_checkpoint=true"], tmp_path / "async")
    for step in ("step_4", "step_8"):
        a = _tensors(tmp_path / "sync" / "checkpoints" / step, tmp_path)
        b = _tensors(tmp_path / "async" / "checkpoints" / step, tmp_path)
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k], b[k])], step
    print(
        f"blocked per save: sync {sync['checkpoint_blocked_s_mean']:.3f} s, "
        f"async {asyn['checkpoint_blocked_s_mean']:.3f} s"
    )
    assert asyn["checkpoint_saves"] == sync["checkpoint_saves"] == 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 22 MiB filesystem: room for one tiny checkpoint, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _step_of(checkpoint: Path) -> int:
    state = {"trainer": {"step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return int(state["trainer"]["step"])


def test_a_full_disk_warns_keeps_the_previous_checkpoint_and_trains_on(
    compose_cfg, small_disk: Path
) -> None:
    summary = _train(compose_cfg, ["trainer.on_checkpoint_error=warn"], small_disk)
    assert summary["steps"] == 8 and summary["checkpoint_failed_saves"] == 1
    ckpts = small_disk / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_4"]
    assert [p.name for p in ckpts.iterdir()] == ["step_4"]  # no temp dir left behind
    assert _step_of(ckpts / "step_4") == 4
    assert json.loads((small_disk / "summary.json").read_text())["steps"] == 8


def test_a_full_disk_stops_the_run_naming_the_checkpoint_that_is_whole(
    compose_cfg, small_disk: Path
) -> None:
    with pytest.raises(CheckpointSaveError) as info:
        _train(compose_cfg, ["trainer.async_checkpoint=false"], small_disk)
    message = str(info.value)
    assert "checkpoint at step 8 failed" in message and "step_4 is whole" in message
    assert "MB free under" in message and "on_checkpoint_error=warn" in message
    ckpts = small_disk / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_4"] and _step_of(ckpts / "step_4") == 4


def test_a_checkpoint_that_would_unpickle_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    state = {"model": model.state_dict(), "trainer": {"step": torch.tensor(3)}}
    dcp.save(
        {**state, "extra": {"note": "an arbitrary object"}}, checkpoint_id=tmp_path, no_dist=True
    )
    (tmp_path / CONFIG_FILE).write_text("{}\n")
    with pytest.raises(ConfigError, match=r"non-tensor entries \['extra.note'\].*unpickle"):
        load_unsharded_model(tmp_path, model)


@pytest.mark.dist
def test_a_failing_rank_ends_the_job_in_bounded_time_with_its_error(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = torchrun(
        *RUN,
        run_dir=tmp_path,
        nproc=2,
        env={"SHARDREC_FAULT_RAISE_AT_STEP": "3"},
        timeout_s=300,
    )
    elapsed_s = time.perf_counter() - start
    print(f"a rank failing mid-run: the job ended after {elapsed_s:.0f} s (rc {proc.returncode})")
    assert proc.returncode != 0
    assert "RuntimeError: fault injection: rank 1 fails after step 3" in proc.stderr
    assert elapsed_s < 150
