"""Follow mode (trainer/online/follow.py): a job that trains partitions as they arrive,
killed mid-partition, resumed: exactly the partitions and figures of an unbroken job.

A real ``python -m trainer online.follow=true`` process starts on a dataset
with one Criteo day; the test appends day 1 once day 0's end is checkpointed
(the job is then polling), and the job SIGKILLs itself after step 14 (fault
injection: a real SIGKILL), halfway through day 1 (checkpoints every 4 steps:
step 12). Day 2 arrives; the same job again (``trainer.resume=auto``) goes on
from step 12, trains the rest of day 1, then day 2, and stops when idle. An
unbroken job over the three days gives the same records (partition, step,
next-partition AUC), the same summary and the same final parameters, bit for bit.

Publishing (``online.publish=true``, trainer/online/follow_publish.py), in one
process: a job resumed after a kill that landed between a partition's last
checkpoint and its publish publishes it first, then day 1 mid-partition
(``online.publish_every_steps``) and at its end (complete bundles: each
``version.json`` names its step, the last scores its sample.pt, ``LATEST`` on
it, keep-K), and nothing twice. With publishing on (slow tier), the killed job above
publishes one version per partition, none lost or repeated across the kill. A
job that stops while a writer hangs gives it ``online.publish_stop_wait_s``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from compression.bundle import PROGRAM_FILE, load_program
from tests.conftest import CONF_DIR, REPO
from tests.test_partitions import day_lines
from tests.test_prepare_criteo import write_tsv
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import Config, ConfigError, register_configs, to_config
from trainer.data.data_configs import CriteoDataConfig
from trainer.online.follow import FOLLOW_FILE, FOLLOW_PLOT
from trainer.online.publish import VERSION_FILE, latest_name, versions
from trainer.prepare import prepare
from trainer.train import train

STEPS = 8  # per partition
KILL_AT = 14  # day 1 trains steps 8-16; the last checkpoint before the kill is step 12
RUN = [
    "data=criteo",
    "online.follow=true",
    f"online.follow_steps={STEPS}",
    "online.poll_s=0.2",
    "optim.dense_lr_schedule=constant",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=128",
    f"trainer.eval_every_steps={STEPS}",
    "trainer.checkpoint_every_steps=4",
    "trainer.async_checkpoint=false",
    "trainer.progress_bar=false",
    "trainer.plot=false",
    "trainer.num_threads=1",
    "model.embedding_dim=4",
    "model.dense_arch_layer_sizes=[8,4]",
    "model.over_arch_layer_sizes=[8,1]",
]


def add_day(
    dataset: Path,
    day: int,
    *,
    table_rows: int = 48,
    rows: int = 300,
    name: str = "",
) -> None:
    name = name or f"day_{day}"
    raw = write_tsv(
        dataset.parent / name, day_lines(rows, low=10 * day, high=10 * day + 30, seed=day)
    )
    prepare(
        CriteoDataConfig(
            raw=[str(raw)],
            dir=str(dataset),
            partition=name,
            mapping="vocab",
            min_count=1,
            table_rows=[table_rows],
            eval_fraction=0.1,
            num_workers=1,
        ),
        progress=False,
    )


def _cfg(dataset: Path, *overrides: str) -> Config:
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*RUN, f"data.dir={dataset}", *overrides])
            return to_config(cfg)
    finally:
        GlobalHydra.instance().clear()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / FOLLOW_FILE).read_text().splitlines() if x]


def tensors(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model entries of a DCP checkpoint, full size."""
    dcp_to_torch_save(checkpoint, out)
    return {k: v for k, v in torch.load(out)["model"].items() if isinstance(v, torch.Tensor)}


def without_publish(record: dict) -> dict:
    """A follow.jsonl record less what publishing adds to it (timings, versions)."""
    return {k: v for k, v in record.items() if not k.startswith(("publish_", "partition_wall"))}


def stamp(exports: Path, version: int) -> dict:
    return json.loads((exports / f"v{version}" / VERSION_FILE).read_text())


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout_s}s"
        time.sleep(0.2)


# Publishing on (slow: three niced exports): no version lost or repeated across the kill.
@pytest.mark.parametrize("publish", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_follow_resumes_after_a_kill_as_if_never_stopped(tmp_path: Path, publish: bool) -> None:
    published = ["online.publish=true", "online.publish_keep=3"] if publish else []
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer",
                *RUN,
                f"data.dir={dataset}",
                "online.idle_timeout_s=120",
                *published,
                f"hydra.run.dir={killed}",
            ],
            cwd=REPO,
            env={
                **os.environ,
                "SHARDREC_FAULT_KILL_AT_STEP": str(KILL_AT),
                "SHARDREC_FAULT_RANK": "0",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(killed / "checkpoints" / f"step_{STEPS}", proc, log)  # day 0 done
            if publish:  # day 0's version lands before the kill (one in flight is lost)
                wait_for(killed / "exports" / "v1", proc, log)
            add_day(dataset, 1)  # arrives while the job polls
            assert proc.wait(timeout=240) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [r["partition"] for r in records(killed)] == ["day_0", "day_1"]
    saved = [int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*")]
    assert max(saved) == 12  # mid day 1: the resume redoes steps 13-14
    add_day(dataset, 2)
    resumed = train(_cfg(dataset, "online.idle_timeout_s=1", *published), run_dir=killed)
    unbroken_dir = tmp_path / "unbroken"
    unbroken = train(_cfg(dataset, "online.idle_timeout_s=1"), run_dir=unbroken_dir)

    for summary in (resumed, unbroken):
        assert summary["partitions"] == ["day_0", "day_1", "day_2"]
        assert summary["steps"] == 3 * STEPS and summary["stopped"] == "idle"
    got, want = records(killed), records(unbroken_dir)
    assert [(r["partition"], r["step"], r["steps"]) for r in got] == [
        ("day_0", 0, STEPS),
        ("day_1", STEPS, STEPS),
        ("day_2", 2 * STEPS, STEPS),
    ]
    assert [without_publish(r) for r in got] == want  # the same figures, bit for bit
    if publish:  # v1 before the kill; day_1 (its rest trained after the resume) and day_2
        exports = killed / "exports"
        assert latest_name(exports) == "v3" and resumed["publish"]["count"] == 2
        stamps = [stamp(exports, k) for k in versions(exports)]
        assert [(x["version"], x["partition"], x["step"]) for x in stamps] == [
            (1, "day_0", STEPS),
            (2, "day_1", 2 * STEPS),
            (3, "day_2", 3 * STEPS),
        ]
        assert [r["publish_version"] for r in got] == ["v1", "v2", "v3"]
    for key in ("auc", "logloss", "last_partition_auc", "final_train_loss"):
        assert resumed[key] == unbroken[key], key
    final = f"step_{3 * STEPS}"
    a = tensors(killed / "checkpoints" / final, tmp_path / "a.pt")
    b = tensors(unbroken_dir / "checkpoints" / final, tmp_path / "b.pt")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Nothing new: the job resumes at its end, trains nothing and stops when idle.
    again = train(_cfg(dataset, "online.idle_timeout_s=0.5"), run_dir=unbroken_dir)
    assert again["steps"] == 3 * STEPS and again["partitions"] == unbroken["partitions"]
    assert records(unbroken_dir) == want


def test_quiet_partitions_are_trained_or_evaluated_and_the_job_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A quiet hour: 4 rows give 0 eval rows (eval_fraction 0.1), 6 rows one eval row
    (one class). The job trains both, records null figures and says why, and stops when
    idle; resumed on a new day it ends as an unbroken job does. (In this process: the
    kill-and-resume test above runs the real command.)"""
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    add_day(dataset, 1, rows=4, name="quiet")
    add_day(dataset, 1, rows=6, name="lone")
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="trainer.online.follow"):
        first = train(_cfg(dataset, "online.idle_timeout_s=0.5"), run_dir=run_dir)
    assert "partition quiet: auc null before 8 steps on it (no eval rows" in caplog.text
    assert "partition lone: auc null before 8 steps on it (one class" in caplog.text
    assert first["partitions"] == ["day_0", "quiet", "lone"]
    assert first["auc"] is None and first["last_partition_auc"] is None  # no NaN in JSON
    assert json.loads((run_dir / "summary.json").read_text())["auc"] is None
    add_day(dataset, 2)
    resumed = train(_cfg(dataset, "online.idle_timeout_s=0.5"), run_dir=run_dir)
    unbroken_dir = tmp_path / "unbroken"
    unbroken = train(_cfg(dataset, "online.idle_timeout_s=0.5"), run_dir=unbroken_dir)
    got = records(run_dir)
    assert got == records(unbroken_dir)
    assert [(r["partition"], r["step"], r["steps"]) for r in got] == [
        ("day_0", 0, STEPS),
        ("quiet", STEPS, STEPS),
        ("lone", 2 * STEPS, STEPS),
        ("day_2", 3 * STEPS, STEPS),
    ]
    quiet, lone = got[1], got[2]
    assert quiet["num_samples"] == 0 and quiet["auc"] is None and quiet["logloss"] is None
    assert quiet["note"] == "no eval rows: its next-partition figures are null"
    assert lone["num_samples"] == 1 and lone["auc"] is None and lone["logloss"] is not None
    assert "note" not in got[3]
    assert resumed["auc"] == got[3]["auc"]  # the mean of partitions 1.. skips the nulls
    for key in ("auc", "logloss", "last_partition_auc", "final_train_loss", "partitions"):
        assert resumed[key] == unbroken[key], key
    final = f"step_{4 * STEPS}"
    a = tensors(run_dir / "checkpoints" / final, tmp_path / "a.pt")
    b = tensors(unbroken_dir / "checkpoints" / final, tmp_path / "b.pt")
    assert all(torch.equal(a[key], b[key]) for key in a) and len(a) == len(b) > 0


def test_a_partition_with_no_train_rows_is_evaluated_only(tmp_path: Path) -> None:
    """One row, no eval split, data.eval_fraction=0.9: its row is held out. It is evaluated
    (no steps, no checkpoint); a job stopped after it, resumed, records it once."""
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    add_day(dataset, 1, rows=1, name="one")
    run_dir = tmp_path / "run"
    held_out = ["data.eval_fraction=0.9", "online.idle_timeout_s=0.3"]
    first = train(_cfg(dataset, *held_out), run_dir=run_dir)
    assert first["partitions"] == ["day_0", "one"] and first["steps"] == STEPS
    add_day(dataset, 2)
    again = train(_cfg(dataset, *held_out), run_dir=run_dir)
    assert again["partitions"] == ["day_0", "one", "day_2"] and again["steps"] == 2 * STEPS
    got = records(run_dir)
    assert [(r["partition"], r["step"], r["steps"]) for r in got] == [
        ("day_0", 0, STEPS),
        ("one", STEPS, 0),
        ("day_2", STEPS, STEPS),
    ]
    assert got[1]["num_samples"] == 1 and "no train rows: evaluated only" in got[1]["note"]


def test_follow_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.dense_lr_schedule=constant"):
        train(_cfg(tmp_path, "optim.dense_lr_schedule=cosine"), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="trainer.export=true would write no bundle"):
        train(
            _cfg(tmp_path, "trainer.export=true", "online.idle_timeout_s=0.3"),
            run_dir=tmp_path / "r",
        )
    with pytest.raises(ConfigError, match="no partition in"):
        train(_cfg(tmp_path / "empty", "online.idle_timeout_s=0.3"), run_dir=tmp_path / "r")


def test_a_partition_whose_tables_grew_is_refused_naming_the_feature(tmp_path: Path) -> None:
    dataset = tmp_path / "days"
    for day in (0, 1):  # table_rows=0: each vocabulary's own size, growing with day 1's ids
        add_day(dataset, day, table_rows=0)
    with pytest.raises(ConfigError, match="feature 'cat_0'.*data.table_rows"):
        train(_cfg(dataset, "online.idle_timeout_s=5"), run_dir=tmp_path / "r")
    assert [r["partition"] for r in records(tmp_path / "r")] == ["day_0"]


# Day 1 (steps 8-16) is also published mid-partition, at step 12.
EVERY = 12
PUBLISH = [
    "online.publish=true",
    "online.publish_keep=2",
    f"online.publish_every_steps={EVERY}",
    "online.idle_timeout_s=0.3",
]


def scores_its_sample(bundle: Path) -> float:
    """The bundle's program on its sample.pt: the largest gap to the scores it holds."""
    sample = torch.load(bundle / "sample.pt", weights_only=True)
    with torch.no_grad():
        scores = load_program(bundle / PROGRAM_FILE)(
            sample["dense"], sample["ids"], sample["lengths"]
        )
    return float((scores - sample["scores"]).abs().max())


def test_follow_publishes_each_partition_once_across_a_resume(tmp_path: Path) -> None:
    # What a kill after day_0's last checkpoint (step 8), before v1 was renamed into
    # place, leaves: that checkpoint, nothing published, a hidden half-written version
    # (day_0 trained here with publishing off).
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    run_dir = tmp_path / "run"
    train(_cfg(dataset, *PUBLISH, "online.publish=false"), run_dir=run_dir)
    exports = run_dir / "exports"
    (exports / ".tmp-v1-1").mkdir(parents=True)
    add_day(dataset, 1)
    summary = train(_cfg(dataset, *PUBLISH, "trainer.plot=true"), run_dir=run_dir)
    assert summary["partitions"] == ["day_0", "day_1"]
    assert latest_name(exports) == "v3" and versions(exports) == [2, 3]  # keep 2
    assert not [p.name for p in exports.iterdir() if p.name.startswith(".")]
    # online.publish_every_steps=12: day_1's model at step 12, then at its end.
    for version, step in ((2, EVERY), (3, 2 * STEPS)):
        assert stamp(exports, version) | {"published_at": 0} == {
            "version": version,
            "step": step,
            "partition": "day_1",
            "index": 1,
            "published_at": 0,
        }
    assert scores_its_sample(exports / "v3") < 1e-5
    got = records(run_dir)
    assert [r["publish_version"] for r in got] == ["v1", "v3"]  # day_0's on resuming
    assert [r["publish_count"] for r in got] == [1, 2]
    for r in got:
        assert r["publish_s"] > 0 and r["publish_blocked_s"] > 0
    assert got[1]["publish_blocked_s"] < got[1]["partition_wall_s"]  # trained here
    p = summary["publish"]
    assert (p["count"], p["latest"], p["errors"]) == (3, "v3", [])
    assert p["blocked_s"] == pytest.approx(sum(r["publish_blocked_s"] for r in got))
    assert summary["export"]["path"] == "exports/v3"
    assert (run_dir / FOLLOW_PLOT).stat().st_size > 0
    # Published already: a resume publishes nothing.
    again = train(_cfg(dataset, *PUBLISH), run_dir=run_dir)
    assert again["publish"]["count"] == 0 and versions(exports) == [2, 3]
    assert records(run_dir) == got


def test_a_partition_with_no_eval_rows_is_not_published_and_the_next_one_is(
    tmp_path: Path,
) -> None:
    """A quiet hour (4 rows: no eval rows to score a bundle with) is trained, not
    published (neither at step 12 nor at its end, 16); the next partition publishes the model
    that has learnt from both, and LATEST never names a bundle without a sample."""
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    add_day(dataset, 1, rows=4, name="quiet")
    add_day(dataset, 2)
    run_dir = tmp_path / "run"
    summary = train(_cfg(dataset, *PUBLISH), run_dir=run_dir)
    got = records(run_dir)
    assert [r["partition"] for r in got] == ["day_0", "quiet", "day_2"]
    assert [r.get("publish_version") for r in got] == ["v1", None, "v2"]  # steps 8, -, 24
    assert got[1]["publish_skipped"] == "no eval rows to score the bundle with"
    assert "publish_count" not in got[1]
    exports = run_dir / "exports"
    assert latest_name(exports) == "v2" and versions(exports) == [1, 2]
    assert stamp(exports, 2)["partition"] == "day_2" and stamp(exports, 2)["step"] == 3 * STEPS
    assert scores_its_sample(exports / "v2") < 1e-5
    assert summary["publish"]["count"] == 2 and summary["publish"]["errors"] == []


T = 300  # publish_timeout_s here: what a stop would wait for without the stop wait


def test_a_stopping_follow_job_cuts_the_writer_in_flight_short(tmp_path: Path, monkeypatch) -> None:
    """The follow job's stop path (a raise at step 14; a preemption takes the same
    path) gives the writer in flight ``online.publish_stop_wait_s``, not
    ``online.publish_timeout_s``. v2's writer (day_1 at step 12) writes, then
    hangs; it is killed and dropped, LATEST stays v1 (day_0's), nothing
    half-written is left. Without the stop wait it takes the whole timeout."""
    monkeypatch.setenv("SHARDREC_FAULT_PUBLISH_HANG", "2")
    monkeypatch.setenv("SHARDREC_FAULT_RAISE_AT_STEP", "14")
    monkeypatch.setenv("SHARDREC_FAULT_RANK", "0")
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    add_day(dataset, 1)
    run_dir = tmp_path / "run"
    cfg = _cfg(dataset, *PUBLISH, "online.publish_stop_wait_s=2", f"online.publish_timeout_s={T}")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="step 14"):
        train(cfg, run_dir=run_dir)
    exports = run_dir / "exports"
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    assert versions(exports) == [1] and latest_name(exports) == "v1"
    assert stamp(exports, 1)["partition"] == "day_0"
    assert time.monotonic() - started < T - 30  # the stop wait, not publish_timeout_s
