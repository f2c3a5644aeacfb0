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
   ``trainer.checkpoint_every_steps`` and at each partition's end).

With nothing new it looks again every ``online.poll_s`` seconds and stops
cleanly after ``online.idle_timeout_s`` (exit 0; 0: never). A SIGTERM/SIGUSR1
while it waits also stops it with exit 0 (the last partition's end is already
checkpointed); one while it trains is any run's preemption (finish the step,
checkpoint, exit 75; trainer/resilience/preempt.py). The checkpoint's ``data``
entry holds the partition, its steps and the manifest's history up to it, so
``trainer.resume=auto`` after a kill goes on exactly: the rest of that
partition from the checkpoint's step, then the next; no partition twice, none
skipped. Rank 0 reads the manifest and tells the others (every rank trains the
same partition).

Example::

    summary = follow(cfg, run_dir=Path("outputs/follow"))   # cfg.online.follow = True
    summary["partitions"]                                    # ["day_0", "day_1", ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sharding.collectives import any_rank, broadcast_object
from trainer.config.schema import Config, ConfigError
from trainer.config.validate_follow import validate_follow
from trainer.loop.trainer import Trainer
from trainer.online.partition_stream import PartitionStream
from trainer.session import session

log = logging.getLogger(__name__)

FOLLOW_FILE = "follow.jsonl"
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
        job = Follow(cfg, trainer=s.trainer, stream=stream, run_dir=s.run_dir)
        if s.resume() is not None:
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
        self, cfg: Config, *, trainer: Trainer, stream: PartitionStream, run_dir: Path
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.stream = stream
        self.run_dir = run_dir
        self.is_main = trainer.env.is_main
        self.records: list[dict[str, Any]] = []
        self.is_resumed = False

    def resumed(self) -> None:
        """After a checkpoint was loaded: keep the records up to its partition."""
        self.is_resumed = True
        path = self.run_dir / FOLLOW_FILE
        if path.is_file():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x]
            self.records = [r for r in lines if r["index"] <= self.stream.index]
        if self.is_main:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            log.info("resumed in partition %s at step %d", self.stream.name, self.trainer.step)

    def run(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Follows the dataset until idle or stopped; returns the summary."""
        t, o = self.trainer, self.cfg.online
        first_step, last_fit, stopped = t.step, {}, "idle"
        if self.is_main and not self.is_resumed:
            (self.run_dir / FOLLOW_FILE).write_text("")
        if self.stream.begun and t.step < self.stream.end_step:  # resumed mid-partition
            last_fit = self._train(extra)
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
                self._start(following)
                last_fit = self._train(extra)
                idle_since = time.monotonic()
                continue
            if self._signalled():
                stopped = "signal"
                break
            if o.idle_timeout_s and idle >= o.idle_timeout_s:
                break
            time.sleep(o.poll_s)
        if not last_fit:  # nothing trained in this process: report the model as it is
            last_fit = t.summarise({**t.evaluate(), **extra})
        later = self.records[1:]  # partition 0 meets an untrained model
        summary = {k: v for k, v in last_fit.items() if k not in _EVAL_KEYS}
        summary.update(
            {
                **{k: _mean(later, k) for k in _EVAL_KEYS[:4]},
                "last_partition_auc": last_fit.get("auc"),
                "partitions": self.stream.consumed(t.step),
                "stopped": stopped,
                "steps": t.step,
                "samples_per_sec": (t.step - first_step)
                * t.settings.batch_size
                * t.env.world_size
                / max(t.train_time_s, 1e-9),
            }
        )
        if self.is_main:
            log.info("follow: %s after %s", stopped, summary["partitions"])
        return summary

    def _start(self, index: int) -> None:
        """Opens partition ``index``, evaluates on it, and sets the steps it trains."""
        t = self.trainer
        try:
            self.stream.open(index)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err
        steps = self.cfg.online.follow_steps or max(
            1, self.stream.num_train_samples // (t.settings.batch_size * t.env.world_size)
        )
        metrics = t.evaluate()
        record = {
            "partition": self.stream.name,
            "index": index,
            "step": t.step,
            "steps": steps,
            **{key: metrics[key] for key in _EVAL_KEYS},
        }
        self.records.append(record)
        if self.is_main:
            with (self.run_dir / FOLLOW_FILE).open("a") as out:
                out.write(json.dumps(record) + "\n")
            log.info(
                "partition %s: auc %.4f before %d steps on it",
                record["partition"],
                metrics["auc"],
                steps,
            )
        self.stream.begin(start_step=t.step, end_step=t.step + steps)

    def _train(self, extra: dict[str, Any]) -> dict[str, Any]:
        t = self.trainer
        t.settings = dataclasses.replace(t.settings, num_steps=self.stream.end_step)
        return t.fit(extra=extra)

    def _signalled(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree)."""
        p = self.trainer.preemption
        flag = torch.tensor([int(p is not None and p.requested is not None)])
        return bool(any_rank(flag.to(self.trainer.env.device)).item())


def _mean(records: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records]
    return sum(values) / len(values) if values else float("nan")
