"""Follow mode: one job trains a dataset's partitions as they arrive.

``python -m trainer online.follow=true data=criteo data.dir=DIR
optim.dense_lr_schedule=constant`` (``train()`` hands over here) watches
``DIR/manifest.json`` (a partitioned dataset, trainer/data/partitions.py,
appended to by ``python -m trainer.prepare ... data.partition=NAME``) and, for
each partition in the manifest's order:

1. open it (:class:`trainer.online.partition_stream.PartitionStream`);
2. evaluate the model trained so far on its eval split (the next-partition AUC,
   NE, calibration), one record in ``follow.jsonl``;
3. train ``online.follow_steps`` steps on it (0: one pass over its train rows)
   with the same ``Trainer`` (its ``num_steps`` moved to the partition's end),
   which evaluates at the end and checkpoints (every
   ``trainer.checkpoint_every_steps`` and at each partition's end);
4. with ``online.publish``, publish the serving bundle at the partition's end (and
   every ``online.publish_every_steps`` steps): ``exports/v<k>/`` and
   ``exports/LATEST``, written in the background
   (trainer/online/follow_publish.py); the record gets ``publish_version``,
   ``publish_blocked_s``, ``publish_s``, ``partition_wall_s`` and
   ``publish_share``, the summary ``publish`` and ``export``.

A quiet partition does not stop the job: with no eval rows it is trained and its
record's figures are null; with no train rows it is evaluated only (0 steps); a
figure that is undefined (a one-class eval's AUC and NE) is null, never NaN, and
the record's ``note`` says why; the summary's means skip nulls.

With nothing new it looks again every ``online.poll_s`` seconds and stops
cleanly after ``online.idle_timeout_s`` (exit 0; 0: never). A SIGTERM/SIGUSR1
while it waits also stops it with exit 0 (the last partition's end is already
checkpointed); one while it trains is any run's preemption (finish the step,
checkpoint, exit 75; trainer/resilience/preempt.py). The checkpoint's ``data``
entry holds the partition, its steps and the manifest's history up to it, so
``trainer.resume=auto`` after a kill goes on exactly: the rest of that
partition from the checkpoint's step, then the next; no partition twice, none
skipped (nor published twice or left unpublished: follow_publish.py). At
the end, with ``trainer.plot``, ``follow.png``: the AUC before training on each
partition (trainer/online/report.py). Rank 0 reads the manifest and tells the
others (every rank trains the same partition).

Example::

    summary = follow(cfg, run_dir=Path("outputs/follow"))   # cfg.online.follow = True
    summary["partitions"]                                    # ["day_0", "day_1", ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from sharding.collectives import any_rank, broadcast_object
from trainer.config.schema import Config, ConfigError
from trainer.config.validate_follow import validate_follow
from trainer.loop.trainer import Trainer
from trainer.online import report
from trainer.online.follow_publish import FollowPublishing
from trainer.online.partition_stream import PartitionStream
from trainer.session import Built, session

log = logging.getLogger(__name__)

FOLLOW_FILE = "follow.jsonl"
FOLLOW_PLOT = "follow.png"
# Checkpoints at each partition's end (the Trainer saves at its last step) when
# trainer.checkpoint_every_steps is 0: an interval no run reaches.
AT_PARTITION_END = 1 << 62
_EVAL_KEYS = ("auc", "logloss", "ne", "calibration", "ctr", "num_samples")


def follow(cfg: Config, *, run_dir: Path) -> dict[str, Any]:
    """Runs follow mode (``cfg.online.follow``); returns the summary (also in ``summary.json``)."""
    validate_follow(cfg)  # before waiting for a first partition
    stream = PartitionStream(cfg.data, seed=cfg.trainer.seed)
    try:
        _wait_for_first(stream, poll_s=cfg.online.poll_s, timeout_s=cfg.online.idle_timeout_s)
        stream.open(0)  # the model's tables: the first partition's
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    every = cfg.trainer.checkpoint_every_steps or AT_PARTITION_END
    with session(cfg, run_dir=run_dir, source=stream, checkpoint_every_steps=every) as s:
        resumed = s.resume() is not None
        job = Follow(cfg, trainer=s.trainer, stream=stream, built=s.built, run_dir=s.run_dir)
        if resumed:
            job.resumed()
        return s.finish(job.run(extra=s.extra()))


def _wait_for_first(stream: PartitionStream, *, poll_s: float, timeout_s: float) -> None:
    """Every rank on its own (no process group yet): until the manifest lists one."""
    start = time.monotonic()
    while not stream.refresh():
        if timeout_s and time.monotonic() - start >= timeout_s:
            raise ValueError(
                f"no partition in {stream.directory} after online.idle_timeout_s={timeout_s}: "
                "prepare one with python -m trainer.prepare ... "
                f"data.dir={stream.directory} data.partition=NAME"
            )
        time.sleep(poll_s)


class Follow:
    """Evaluate-then-train over the partitions as they arrive (see the module docstring)."""

    def __init__(
        self, cfg: Config, *, trainer: Trainer, stream: PartitionStream, built: Built, run_dir: Path
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.stream = stream
        self.run_dir = run_dir
        self.is_main = trainer.env.is_main
        self.records: list[dict[str, Any]] = []
        self.is_resumed = False
        self.publishing = (
            FollowPublishing(cfg, built=built, stream=stream, run_dir=run_dir, is_main=self.is_main)
            if cfg.online.publish
            else None
        )

    def resumed(self) -> None:
        """After a checkpoint was loaded: keep the records up to its partition."""
        self.is_resumed = True
        path = self.run_dir / FOLLOW_FILE
        if path.is_file():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x]
            self.records = [r for r in lines if r["index"] <= self.stream.index]
        self._write_records()
        if self.is_main:
            log.info("resumed in partition %s at step %d", self.stream.name, self.trainer.step)

    def run(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Follows the dataset until idle or stopped; returns the summary."""
        t = self.trainer
        first_step, last_fit = t.step, {}
        if self.is_main and not self.is_resumed:
            (self.run_dir / FOLLOW_FILE).write_text("")
        try:
            if self.stream.begun:  # resumed
                if self.publishing and self.publishing.due(t.step):  # killed before publishing
                    self._publish()
                if t.step < self.stream.end_step:  # mid-partition: the rest of it
                    last_fit = self._train(extra, start=time.perf_counter())
            stopped, fit = self._follow(extra)
            last_fit = fit or last_fit
        except BaseException:  # e.g. preempted: the publish in flight lands, or is cut
            if self.publishing is not None:
                wait_s = self.cfg.online.publish_stop_wait_s
                self.publishing.close(self.records, within_s=wait_s)
            raise
        if not last_fit:  # nothing trained in this process: report the model as it is
            last_fit = t.summarise({**t.evaluate(), **extra})
        later = self.records[1:]  # partition 0 meets an untrained model
        summary = {k: v for k, v in last_fit.items() if k not in _EVAL_KEYS}
        summary.update(
            {
                **{k: _mean(later, k) for k in _EVAL_KEYS[:4]},
                "last_partition_auc": _figure(last_fit.get("auc")),
                "partitions": self.stream.consumed(t.step),
                "stopped": stopped,
                "steps": t.step,
                "samples_per_sec": (t.step - first_step)
                * t.settings.batch_size
                * t.env.world_size
                / max(t.train_time_s, 1e-9),
            }
        )
        if self.publishing is not None:
            summary.update(self.publishing.summary(self.records))
            self._write_records()
        if self.is_main:
            log.info("follow: %s after %s", stopped, summary["partitions"])
            if self.cfg.trainer.plot and self.records:
                report.plot_partitions(self.records, self.run_dir / FOLLOW_PLOT)
        return summary

    def _follow(self, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Trains each new partition until idle or signalled; returns why it stopped and
        the last fit's summary ({} if none)."""
        o = self.cfg.online
        last_fit: dict[str, Any] = {}
        idle_since = time.monotonic()
        while True:
            # Rank 0's view of the manifest, on every rank: they train the same partition.
            names, paths, idle = broadcast_object(
                (self.stream.refresh(), self.stream.paths, time.monotonic() - idle_since)
                if self.is_main
                else None
            )
            self.stream.names, self.stream.paths = names, paths
            following = self.stream.index + 1 if self.stream.begun else 0
            if following < len(names):
                start = time.perf_counter()
                self._start(following)
                last_fit = self._train(extra, start=start)
                idle_since = time.monotonic()
                continue
            if self._signalled():
                return "signal", last_fit
            if o.idle_timeout_s and idle >= o.idle_timeout_s:
                return "idle", last_fit
            if self.publishing is not None and self.publishing.collect(self.records):
                self._write_records()  # publish_s while it waits
            time.sleep(o.poll_s)

    def _start(self, index: int) -> None:
        """Opens partition ``index``, evaluates on it, and sets the steps it trains."""
        t = self.trainer
        try:
            self.stream.open(index)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err
        num_train = self.stream.num_train_samples
        steps = 0  # no train rows: evaluated only
        if num_train:
            global_batch = t.settings.batch_size * t.env.world_size
            steps = self.cfg.online.follow_steps or max(1, num_train // global_batch)
        metrics = t.evaluate()
        record = {
            "partition": self.stream.name,
            "index": index,
            "step": t.step,
            "steps": steps,
            **{key: _figure(metrics[key]) for key in _EVAL_KEYS},
        }
        note = _quiet(metrics, num_train=num_train)
        if note:
            record["note"] = note
        self.records.append(record)
        if self.is_main:
            with (self.run_dir / FOLLOW_FILE).open("a") as out:
                out.write(json.dumps(record) + "\n")
            auc = "null" if record["auc"] is None else f"{record['auc']:.4f}"
            log.info(
                "partition %s: auc %s before %d steps on it%s",
                record["partition"],
                auc,
                steps,
                f" ({note})" if note else "",
            )
        self.stream.begin(start_step=t.step, end_step=t.step + steps)

    def _train(self, extra: dict[str, Any], *, start: float) -> dict[str, Any]:
        """Trains the current partition to its end, publishing where due; ``start``: when
        this process began on it (its wall time)."""
        t, end = self.trainer, self.stream.end_step
        if self.publishing is None:
            t.settings = dataclasses.replace(t.settings, num_steps=end)
            return t.fit(extra=extra)
        last_fit: dict[str, Any] = {}
        for stop, publish in self.publishing.stops(t.step, end):
            t.settings = dataclasses.replace(t.settings, num_steps=stop)
            last_fit = t.fit(extra=extra)
            if publish:
                self._publish()
        self.publishing.partition_done(self._record(), wall_s=time.perf_counter() - start)
        self.publishing.collect(self.records)
        self._write_records()
        return last_fit

    def _publish(self) -> None:
        """Collective: publishes the model at this step into the partition's record."""
        assert self.publishing is not None
        self.publishing.publish(step=self.trainer.step, record=self._record())
        self._write_records()

    def _record(self) -> dict[str, Any]:
        return next(r for r in self.records if r["index"] == self.stream.index)

    def _write_records(self) -> None:
        """follow.jsonl, replaced whole (rank 0): records change as publishes finish."""
        if self.is_main:
            tmp = self.run_dir / f".{FOLLOW_FILE}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.run_dir / FOLLOW_FILE)

    def _signalled(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree)."""
        p = self.trainer.preemption
        flag = torch.tensor([int(p is not None and p.requested is not None)])
        return bool(any_rank(flag.to(self.trainer.env.device)).item())


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    """The mean of the records' defined figures (None: none is)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _figure(value: float | None) -> float | None:
    """A figure as follow.jsonl and summary.json hold it: null where undefined (NaN is
    not JSON): no eval rows, or one class (AUC, NE)."""
    return None if value is None or not math.isfinite(value) else value


def _quiet(metrics: dict[str, float], *, num_train: int) -> str:
    """Why a partition's record lacks figures or training ('' if it does not)."""
    notes = []
    if not metrics["num_samples"]:
        notes.append("no eval rows: its next-partition figures are null")
    elif metrics["ctr"] in (0.0, 1.0):
        notes.append("one class in its eval rows: auc and ne are null")
    if not num_train:
        notes.append("no train rows: evaluated only")
    return "; ".join(notes)
