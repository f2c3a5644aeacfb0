"""Loading a checkpoint never runs code it holds (issue 19).

DCP's ``.metadata`` is a pickle. A copy of a real checkpoint whose
``.metadata`` would create a marker file when unpickled (``posix.system``,
``builtins.exec``) is resumed (``python -m trainer trainer.resume=DIR``),
used as a distillation teacher (``distill.teacher_checkpoint=DIR``) and
exported (``python -m trainer.export DIR``), each a real process: the marker
is never created, and each ends in one line naming the file (``shardrec:
...``), exit status 2, no traceback. Damaged checkpoints (truncated or garbage
metadata, a missing or truncated data file) end the same way. Unit tests: the
restricted unpickler accepts a real checkpoint's metadata, and every global
that metadata names is one it admits, and refuses crafted ones.

Measured on the code before the fix (DCP's plain ``FileSystemReader``): the
resume and the export created the marker and ended in a traceback or Hydra's
"Set HYDRA_FULL_ERROR=1" message.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.processes import run
from trainer.checkpoint.load import check_checkpoint
from trainer.checkpoint.safe_reader import (
    _ADMITTED,
    METADATA_FILE,
    BadCheckpointError,
    load_metadata_file,
    read_checkpoint_metadata,
)
from trainer.config.schema import ConfigError
from trainer.export.offline import main as export_main

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "trainer=smoke",
    "trainer.num_steps=4",
    "trainer.eval_every_steps=4",
    "data.num_eval_samples=2048",
    "trainer.eval_batch_size=512",
    "trainer.progress_bar=false",
    "trainer.plot=false",
]


class _System:
    """Unpickles as ``os.system(command)`` (pickled as ``posix.system``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class _Exec:
    """Unpickles as ``exec(source)`` (pickled as ``builtins.exec``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.source,))


def _payload(kind: str, marker: Path) -> bytes:
    if kind == "system":
        return pickle.dumps(_System(f"touch {marker}"))
    return pickle.dumps(_Exec(f"open({str(marker)!r}, 'w').write('ran')"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, *args],
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint: ``step_4`` of a one-process run."""
    run_dir = tmp_path_factory.mktemp("real")
    proc = _run(
        "-m", "trainer", *RUN, "trainer.checkpoint_every_steps=4", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "step_4"


def _copy(checkpoint: Path, tmp_path: Path, name: str = "step_4") -> Path:
    copy = tmp_path / "copied" / name
    shutil.copytree(checkpoint, copy)
    return copy


def _crafted(checkpoint: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A copy of ``checkpoint`` whose metadata would create the returned marker."""
    crafted = _copy(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    (crafted / METADATA_FILE).write_bytes(_payload(kind, marker))
    return crafted, marker


def _assert_one_line_exit_2(proc: subprocess.CompletedProcess, *, names: Path) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("shardrec:"), lines[-1]
    assert str(names) in lines[-1], lines[-1]


def test_resume_from_crafted_metadata_runs_no_code(checkpoint: Path, tmp_path: Path) -> None:
    crafted, marker = _crafted(checkpoint, tmp_path, "system")
    proc = _run(
        "-m", "trainer", *RUN, f"trainer.resume={crafted}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert not marker.exists(), "the crafted .metadata ran code on resume"
    _assert_one_line_exit_2(proc, names=crafted / METADATA_FILE)
    assert "posix.system" in proc.stderr and "trainer.resume" in proc.stderr


def test_teacher_from_crafted_metadata_runs_no_code(checkpoint: Path, tmp_path: Path) -> None:
    crafted, marker = _crafted(checkpoint, tmp_path, "exec")
    proc = _run(
        "-m",
        "trainer",
        *RUN,
        "distill=online",
        f"distill.teacher_checkpoint={crafted}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert not marker.exists(), "the crafted .metadata ran code as a teacher"
    _assert_one_line_exit_2(proc, names=crafted / METADATA_FILE)
    assert "builtins.exec" in proc.stderr and "distill.teacher_checkpoint" in proc.stderr


def test_export_of_crafted_metadata_runs_no_code(checkpoint: Path, tmp_path: Path) -> None:
    crafted, marker = _crafted(checkpoint, tmp_path, "exec")
    proc = _run("-m", "trainer.export", str(crafted), "--out", str(tmp_path / "out.pt"))
    assert not marker.exists(), "the crafted .metadata ran code on export"
    _assert_one_line_exit_2(proc, names=crafted / METADATA_FILE)
    assert "builtins.exec" in proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_resume_with_a_missing_data_file_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    damaged = _copy(checkpoint, tmp_path)
    (damaged / "__0_0.distcp").unlink()
    proc = _run(
        "-m", "trainer", *RUN, f"trainer.resume={damaged}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    _assert_one_line_exit_2(proc, names=damaged / "__0_0.distcp")
    assert "is missing" in proc.stderr


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        ("truncated metadata", METADATA_FILE, _truncate),
        ("garbage metadata", METADATA_FILE, lambda p: p.write_bytes(b"\x80\x04garbage")),
        ("empty metadata", METADATA_FILE, lambda p: p.write_bytes(b"")),
        ("missing data file", "__0_0.distcp", Path.unlink),
        ("truncated data file", "__0_0.distcp", _truncate),
    ],
    ids=lambda d: d[0],
)
def test_export_of_a_damaged_checkpoint_is_one_line_and_exit_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: tuple
) -> None:
    _, name, apply = damage
    damaged = _copy(checkpoint, tmp_path)
    apply(damaged / name)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(damaged), "--out", str(tmp_path / "out.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("shardrec:") and str(damaged / name) in err, err
    # The trainer's validation raises the same, naming its key.
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .*damaged or not from shardrec"):
        check_checkpoint(damaged, key="trainer.resume")


def test_a_real_checkpoints_metadata_is_accepted(checkpoint: Path) -> None:
    seen: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add((module, name))
            return super().find_class(module, name)

    with (checkpoint / METADATA_FILE).open("rb") as f:
        Recording(f).load()
    assert seen, "a checkpoint's metadata names DCP's classes"
    assert not [g for g in seen if g[1] not in _ADMITTED.get(g[0], ())], seen
    metadata = read_checkpoint_metadata(checkpoint)
    assert "trainer.step" in metadata.state_dict_metadata
    check_checkpoint(checkpoint, key="trainer.resume")  # no error


@pytest.mark.parametrize(
    "payload, named",
    [
        (lambda m: _payload("system", m), "posix.system"),
        (lambda m: _payload("exec", m), "builtins.exec"),
        # Protocol 0's GLOBAL opcode, and a global of an admitted module not admitted.
        (lambda m: b"cos\nsystem\n(S'touch " + str(m).encode() + b"'\ntR.", "os.system"),
        (lambda m: b"ctorch\nload\n(S'" + str(m).encode() + b"'\ntR.", "torch.load"),
        (
            lambda m: b"ctorch.distributed.checkpoint.metadata\ntorch\n.",
            "torch.distributed.checkpoint.metadata.torch",
        ),
    ],
)
def test_crafted_metadata_is_refused_naming_the_global(
    tmp_path: Path, payload: Any, named: str
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / METADATA_FILE
    path.write_bytes(payload(marker))
    with pytest.raises(BadCheckpointError) as err:
        load_metadata_file(path)
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{path}: refusing to load checkpoint metadata that references ")
    assert f" {named} " in message and "\n" not in message


def test_metadata_of_admitted_classes_in_the_wrong_shape_is_refused(
    checkpoint: Path, tmp_path: Path
) -> None:
    metadata = read_checkpoint_metadata(checkpoint)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../etc/passwd"  # a data file outside the checkpoint
    path = tmp_path / METADATA_FILE
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(BadCheckpointError, match=r"outside the checkpoint directory"):
        load_metadata_file(path)
