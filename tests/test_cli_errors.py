"""No config mistake ends in a traceback: each ends in one line and exit status 2.

A dozen representative mistakes go through the real entry point,
``trainer.__main__.main(argv)``, in this process (compose mistakes stop before
Hydra runs the job; cross-field ones inside it, before any process group);
three go through real processes: ``python -m trainer``, ``python -m
trainer.plan`` (which fail before torch is imported), and two ranks on gloo
whose mistake shows only once the process group is up (every rank ends in the
same line, none hangs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port
from tests.processes import run
from trainer.__main__ import main

# (overrides, words the one line must contain: the key and the allowed values or fix)
MISTAKES = [
    (["trainer.num_stepz=5"], ["trainer.num_stepz", "did you mean trainer.num_steps"]),
    (["trainer.batch_size=lots"], ["trainer.batch_size=lots", "Integer"]),
    (["sharding=row_wsie"], ["sharding=row_wsie", "row_wise", "table_wise"]),
    (["sharding.strategy=row_wsie"], ["sharding.strategy=row_wsie", "row_wise", "grid"]),
    (["precision=bf61"], ["precision=bf61", "bf16, fp16, fp32"]),
    (["logger=tb"], ["logger=tb", "none, wandb"]),
    (["experiment=compression/nope"], ["experiment=compression/nope", "compression/int4_qat"]),
    (["+trainer.foo=1"], ["+trainer.foo", "no such key"]),
    (["-m", "trainer.batch_size=64,lots"], ["trainer.batch_size=lots", "Integer"]),
    (["data.hotness=[1,2]"], ["data.hotness", "one value for all features"]),
    (["model.embedding_dim=32"], ["model.dense_arch_layer_sizes[-1]=16", "embedding_dim=32"]),
    (["qat.bits=3"], ["qat.bits=3", "8 or 4"]),
    (["trainer.resume=/nope"], ["trainer.resume", "/nope"]),
    (["+sharding.tables={t_nope:{strategy:row_wise}}"], ["sharding.tables.t_nope", "no such"]),
    (["data=table", "data.buckets.age=[18,25]"], ["data.buckets.age", "+data.buckets.age=VALUE"]),
    (["sharding=row_wise"], ["sharding.strategy=row_wise", "world_size > 1", "torchrun"]),
]


def _one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("shardrec: config error: ")
    return lines[0]


@pytest.mark.parametrize(("overrides", "words"), MISTAKES, ids=lambda v: " ".join(v))
def test_mistake_is_one_line_and_exit_2(
    overrides: list[str], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*overrides, f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"])
    assert exit_info.value.code == 2
    line = _one_clean_line(capsys.readouterr().err)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "summary.json").exists()


def test_cfg_job_still_prints_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--cfg", "job", "trainer.num_steps=3"])  # Hydra prints and returns: no training
    out = capsys.readouterr().out
    assert "num_steps: 3" in out and "strategy: auto" in out


def test_a_run_that_composes_is_composed_by_hydra_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one-line check composes again only when Hydra's compose failed (a run) or
    before the first job (a sweep); the user's HYDRA_FULL_ERROR is left as it was."""
    import trainer.__main__ as entry

    calls: list[list[str]] = []
    check = entry.exit_on_compose_error
    monkeypatch.setattr(entry, "exit_on_compose_error", lambda a: (calls.append(a), check(a)))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main(["--cfg", "job", "trainer.num_steps=3"])
    assert calls == [] and "HYDRA_FULL_ERROR" not in os.environ
    with pytest.raises(SystemExit) as exit_info:
        main(["--cfg", "job", "sharding=row_wsie"])
    assert exit_info.value.code == 2 and calls == [["--cfg", "job", "sharding=row_wsie"]]
    assert _one_clean_line(capsys.readouterr().err)
    assert "HYDRA_FULL_ERROR" not in os.environ
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the user's own setting survives
    main(["--cfg", "job", "trainer.num_steps=3"])
    assert os.environ["HYDRA_FULL_ERROR"] == "1"
    assert entry.composes_up_front(["-m", "trainer.seed=1,2"])
    assert not entry.composes_up_front(["trainer.seed=1"])


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, *args], cwd=REPO, timeout=300, **kwargs)


def test_python_m_trainer_and_trainer_plan(tmp_path: Path) -> None:
    proc = _run(["-m", "trainer", "sharding=row_wsie", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    assert "choose one of auto, column_wise" in _one_clean_line(proc.stderr)
    proc = _run(["-m", "trainer.plan", "precision=bf61", "topology.world_size=2"])
    assert proc.returncode == 2, proc.stderr
    assert "bf16, fp16, fp32" in _one_clean_line(proc.stderr)


@pytest.mark.parametrize(
    ("module", "mistake"), [("trainer", "sharding=row_wsie"), ("trainer.plan", "precision=bf61")]
)
def test_a_mistake_fails_before_torch_is_imported(module: str, mistake: str) -> None:
    """A typo costs under a second: the entry points check the command line before
    they import torch, torchrec or FBGEMM (about 9 s on a small machine)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, {mistake!r}]\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 2, stop.code\n"
        "heavy = {'torch', 'torchrec', 'fbgemm_gpu', 'torchmetrics', 'tensordict'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout[:500]
    assert mistake in _one_clean_line(proc.stderr)


@pytest.mark.dist
def test_error_after_the_process_group_is_up_ends_every_rank(tmp_path: Path) -> None:
    """UVM caching on CPU is known only once each rank has its device (in build)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        args = ["-m", "trainer", "trainer=smoke", "sharding.compute_kernel=fused_uvm_caching"]
        procs.append(
            subprocess.Popen(
                [sys.executable, *args, f"hydra.run.dir={tmp_path}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for rank, proc in enumerate(procs):
        _, stderr = proc.communicate(timeout=300)  # a hang fails here
        assert proc.returncode == 2, f"rank {rank}: {stderr}"
        assert "needs CUDA" in _one_clean_line(stderr)
