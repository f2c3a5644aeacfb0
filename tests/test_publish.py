"""Published exports (trainer/online/publish.py): atomic versions, LATEST, keep K, blocked time.

A reader process (plain torch + fbgemm_gpu, no shardrec: what a server runs)
polls ``exports/LATEST`` in a loop and loads what it names, checking that each
load is complete: schema.json parses, the program loads and scores the
bundle's sample.pt as the trainer did, version.json names the version. It runs
while (1) a tiny day walk with ``online.publish=true`` publishes every 30 steps
and (2) a slow writer copies a bundle file by file in small chunks; no load
may fail or see a partial bundle. (3) keep-K pruning, numbering after a
restart, a failing writer; (4, slow) publishing does not change what the walk
trains; (5) a 2-rank walk (forked ranks) publishes the gathered model; (6) a
stopping walk waits only ``online.publish_stop_wait_s`` for a hung writer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import fork_trainer
from tests.test_online import TINY, _cfg
from trainer.online.publish import (
    HANG_ENV,
    LATEST_FILE,
    Publisher,
    latest_name,
    read_latest,
    versions,
)
from trainer.online.report import read_records
from trainer.train import train

TWO_DAYS = ["data.days=2", "online.days=2", "trainer.num_steps=80"]
# Steps 30 and 60 (mid-day), not at step 80: 2 versions, pruning is tested below.
PUBLISH = ["online.publish=true", "online.publish_every_steps=30", "online.publish_keep=2"]

# The reader: a server's loop, without shardrec. Loads until STOP exists, then writes
# what it saw; a version pruned while it loaded (its directory gone) is counted apart.
READER = r"""
import json, sys, time
from pathlib import Path
import torch, fbgemm_gpu  # noqa: F401  (fbgemm_gpu registers the lookup op)

exports, out, ready, stop = map(Path, sys.argv[1:5])
if len(sys.argv) > 5:  # warm up: the first load imports much of torch.export
    torch.export.load(str(Path(sys.argv[5]) / "model.pt2"))
loads, errors, pruned = [], [], 0
progress = out.with_suffix(".count")
ready.touch()
while not stop.exists():
    try:
        name = (exports / "LATEST").read_text().strip()
    except FileNotFoundError:
        time.sleep(0.02)
        continue
    bundle = exports / name
    try:
        schema = json.loads((bundle / "schema.json").read_text())
        program = torch.export.load(str(bundle / schema["file"])).module()
        sample = torch.load(bundle / "sample.pt", weights_only=True)
        version = json.loads((bundle / "version.json").read_text())["version"]
        with torch.no_grad():
            scores = program(sample["dense"], sample["ids"], sample["lengths"])
        diff = float((scores - sample["scores"]).abs().max())
        loads.append({"name": name, "version": version, "max_abs_diff": diff})
        progress.write_text(json.dumps(sorted({load["version"] for load in loads})))
    except Exception as err:
        if not bundle.exists():
            pruned += 1
        else:
            errors.append(f"{name}: {type(err).__name__}: {err}")
    time.sleep(0.05)
out.write_text(json.dumps({"loads": loads, "errors": errors, "pruned": pruned}))
"""


class Reader:
    """The reader process polling ``exports`` (see READER)."""

    def __init__(self, exports: Path, scratch: Path, *, warm_up: Path | None = None) -> None:
        self.out, self.stop_file = scratch / "reads.json", scratch / "stop"
        ready = scratch / "ready"
        args = [str(p) for p in (exports, self.out, ready, self.stop_file, warm_up) if p]
        self.proc = subprocess.Popen([sys.executable, "-c", READER, *args])
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.proc.poll() is None, "the reader died while starting"
            assert time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.1)

    def versions_loaded(self) -> list[int]:
        """The versions loaded so far."""
        try:
            return json.loads(self.out.with_suffix(".count").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def stop(self) -> dict[str, Any]:
        self.stop_file.touch()
        assert self.proc.wait(timeout=120) == 0
        return json.loads(self.out.read_text())


def _loaded(reader: Reader, version: int) -> None:
    """Waits until ``reader`` has loaded ``version`` (it is slow on a loaded machine)."""
    deadline = time.monotonic() + 120
    while version not in reader.versions_loaded():
        assert time.monotonic() < deadline, f"the reader did not load v{version}"
        time.sleep(0.1)


def _check_reads(reads: dict[str, Any], *, min_versions: int) -> None:
    assert reads["errors"] == []
    loads = reads["loads"]
    assert all(load["name"] == f"v{load['version']}" for load in loads)
    assert all(load["max_abs_diff"] < 1e-5 for load in loads)
    seen = [load["version"] for load in loads]
    assert seen == sorted(seen)  # LATEST only moves forward
    assert len(set(seen)) >= min_versions


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The tiny walk, 2 days of 40 steps publishing every 30 steps, read meanwhile."""
    run_dir = tmp_path_factory.mktemp("walk")
    reader = Reader(run_dir / "exports", tmp_path_factory.mktemp("reader"))
    try:
        summary = train(_cfg(*TWO_DAYS, *PUBLISH), run_dir=run_dir)
        _loaded(reader, 2)
    finally:
        reads = reader.stop()
    return run_dir, summary, reads


def test_a_reader_polling_during_the_walk_never_loads_a_partial_bundle(published) -> None:
    run_dir, summary, reads = published
    _check_reads(reads, min_versions=1)  # v1 too, unless v2 came before its first load
    name, program = read_latest(run_dir / "exports")  # the helper a server may use
    sample = torch.load(run_dir / "exports" / name / "sample.pt", weights_only=True)
    with torch.no_grad():
        scores = program(sample["dense"], sample["ids"], sample["lengths"])
    assert torch.allclose(scores, sample["scores"], atol=1e-5)


def test_the_walk_publishes_versions_and_reports_blocked_time(published) -> None:
    run_dir, summary, _ = published
    exports = run_dir / "exports"
    assert versions(exports) == [1, 2] and latest_name(exports) == "v2"
    assert not [p.name for p in exports.iterdir() if p.name.startswith(".")]
    # online.publish_every_steps=30: each version is the model at its step.
    steps = [json.loads((exports / f"v{k}" / "version.json").read_text())["step"] for k in (1, 2)]
    assert steps == [30, 60]
    records = read_records(run_dir)
    assert [r["publish_version"] for r in records] == ["v1", "v2"]
    for r in records:
        assert r["publish_count"] == 1
        assert 0 < r["publish_blocked_s"] < r["day_wall_s"]
        assert r["publish_s"] > 0
        assert r["publish_share"] == pytest.approx(r["publish_blocked_s"] / r["day_wall_s"])
    p = summary["publish"]
    assert (p["count"], p["latest"], p["errors"]) == (2, "v2", [])
    assert 0 < p["blocked_share"] < 1
    assert summary["export"]["path"] == "exports/v2"
    assert summary["export"]["bundle_max_abs_diff"] < 1e-5


def _slow_copy(source: Path, *, chunk_bytes: int = 8192, pause_s: float = 0.01):
    """A writer that copies ``source``'s bundle file by file, a chunk at a time: a reader
    that could see a directory being written would find it half done."""

    def write(directory: Path) -> dict[str, Any]:
        directory.mkdir()
        for path in sorted(source.iterdir()):
            if path.name == "version.json":
                continue
            data = path.read_bytes()
            with (directory / path.name).open("wb") as out:
                for at in range(0, len(data), chunk_bytes):
                    out.write(data[at : at + chunk_bytes])
                    out.flush()
                    time.sleep(pause_s)
        return {"files": len(list(directory.iterdir()))}

    return write


def test_a_reader_never_sees_a_slow_writer_half_done(published, tmp_path: Path) -> None:
    run_dir, _, _ = published
    exports = tmp_path / "exports"
    publisher = Publisher(exports, keep=3)
    reader = Reader(exports, tmp_path, warm_up=run_dir / "exports" / "v2")
    try:
        for version in range(1, 5):  # v<k+1> is written while the reader loads v<k>
            publisher.publish(_slow_copy(run_dir / "exports" / "v2"), info={})
            publisher.wait()
            _loaded(reader, version)
    finally:
        reads = reader.stop()
    _check_reads(reads, min_versions=4)
    assert [d["result"] for d in publisher.finished()] == [{"files": 3}] * 4
    assert versions(exports) == [2, 3, 4]


def _touch(directory: Path) -> dict[str, Any]:
    directory.mkdir()
    (directory / "model.pt2").write_text("x")
    return {}


def _fail(directory: Path) -> dict[str, Any]:
    directory.mkdir()
    (directory / "model.pt2").write_text("half")
    raise RuntimeError("disk full")


def test_keep_k_numbering_after_a_restart_and_a_failed_writer(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    publisher = Publisher(exports, keep=2)
    assert [publisher.publish(_touch, info={}) for _ in range(4)] == [1, 2, 3, 4]
    publisher.close()
    assert versions(exports) == [3, 4] and latest_name(exports) == "v4"
    (exports / ".tmp-v9-123").mkdir()  # a killed run's half-written version
    restarted = Publisher(exports, keep=2)  # a resumed walk goes on numbering
    assert not (exports / ".tmp-v9-123").exists()
    assert restarted.publish(_fail, info={"day": 1}) == 5
    restarted.close()
    (failed,) = restarted.finished()
    assert (
        failed["error"] == "RuntimeError: the writer process exited with 1: RuntimeError: disk full"
    )
    assert versions(exports) == [3, 4] and latest_name(exports) == "v4"
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    assert restarted.publish(_touch, info={}) == 6
    restarted.close()
    assert versions(exports) == [4, 6] and (exports / LATEST_FILE).read_text() == "v6\n"


def _hang(directory: Path) -> dict[str, Any]:
    """A writer that really hangs, half done, with a child of its own."""
    directory.mkdir()
    (directory / "model.pt2").write_text("half")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (directory.parent / "grandchild.pid").write_text(str(child.pid))
    time.sleep(3600)
    return {}


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # killed, not reaped
    except FileNotFoundError:
        return True


def test_a_hung_writer_is_killed_at_the_timeout(tmp_path: Path, monkeypatch) -> None:
    exports = tmp_path / "exports"
    publisher = Publisher(exports, keep=3)
    publisher.publish(_touch, info={})
    publisher.wait()
    publisher.timeout_s = 2.0  # the genuine writers above and below may take longer
    start = time.perf_counter()
    assert publisher.publish(_hang, info={"step": 2}) == 2
    assert latest_name(exports) == "v1"
    assert publisher.wait() < 10  # the timeout, not the writer's hour
    (hung,) = [d for d in publisher.finished() if d["version"] == 2]
    assert hung["error"].startswith("TimeoutError: the writer ran past online.publish_timeout_s=2s")
    assert time.perf_counter() - start >= 2.0
    assert _gone(int((exports / "grandchild.pid").read_text()))  # its process group went too
    (exports / "grandchild.pid").unlink()
    assert latest_name(exports) == "v1" and versions(exports) == [1]
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    # The test hook: version 3's writer writes its bundle, then hangs.
    monkeypatch.setenv(HANG_ENV, "3")
    publisher.publish(_touch, info={})
    publisher.wait()
    assert "TimeoutError" in publisher.finished()[0]["error"]
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    publisher.timeout_s = 600.0
    assert publisher.publish(_touch, info={}) == 4  # the next publish goes on
    publisher.close()
    assert "error" not in publisher.finished()[0]
    assert versions(exports) == [1, 4] and latest_name(exports) == "v4"


def test_a_stopping_walk_cuts_the_writer_in_flight_short(tmp_path: Path, monkeypatch) -> None:
    """A walk that stops (here a raise after step 70; a preemption takes the same path)
    gives the writer in flight ``online.publish_stop_wait_s``, not the 600 s timeout:
    under SLURM the job must exit inside its grace period. v2's writer (step 60)
    writes, then hangs; it is killed and dropped, LATEST stays v1."""
    monkeypatch.setenv(HANG_ENV, "2")
    monkeypatch.setenv("SHARDREC_FAULT_RAISE_AT_STEP", "70")
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "0")
    cfg = _cfg(*TWO_DAYS, *PUBLISH, "online.publish_stop_wait_s=2")
    with pytest.raises(RuntimeError, match="step 70"):
        train(cfg, run_dir=tmp_path)
    exports = tmp_path / "exports"
    # Already settled when train() raised: the writer killed, its directory removed.
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    assert versions(exports) == [1] and latest_name(exports) == "v1"


@pytest.mark.slow
def test_publishing_does_not_change_what_the_walk_trains(published, tmp_path: Path) -> None:
    run_dir, _, _ = published
    train(_cfg(*TWO_DAYS), run_dir=tmp_path)
    plain = [(r["day"], r["auc"], r["logloss"]) for r in read_records(tmp_path)]
    assert [(r["day"], r["auc"], r["logloss"]) for r in read_records(run_dir)] == plain


@pytest.mark.dist
def test_two_ranks_publish_the_gathered_model(tmp_path: Path) -> None:
    """The 2-rank path: every rank's table shards are packed and gathered before the
    fork, rank 0's writer publishes; the bundle scores as the trainer's model did."""
    run_dir = tmp_path / "run"
    fork_trainer(*TINY, *TWO_DAYS, *PUBLISH, "sharding=row_wise", run_dir=run_dir)
    exports = run_dir / "exports"
    assert versions(exports) == [1, 2] and latest_name(exports) == "v2"
    steps = [json.loads((exports / f"v{k}" / "version.json").read_text())["step"] for k in (1, 2)]
    assert steps == [30, 60]
    assert [r["publish_version"] for r in read_records(run_dir)] == ["v1", "v2"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (summary["publish"]["count"], summary["publish"]["errors"]) == (2, [])
    export = summary["export"]
    assert export["path"] == "exports/v2" and export["bundle_max_abs_diff"] < 1e-5
    name, program = read_latest(exports)
    sample = torch.load(exports / name / "sample.pt", weights_only=True)
    with torch.no_grad():
        scores = program(sample["dense"], sample["ids"], sample["lengths"])
    assert float((scores - sample["scores"]).abs().max()) < 1e-5
