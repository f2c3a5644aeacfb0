"""Follow mode's publishing: a serving bundle per partition, written in the background.

With ``online.publish=true`` the follow job (trainer/online/follow.py) publishes
through the walk's machinery (trainer/online/publish.py + snapshot.py:
``exports/v<k>/``, ``exports/LATEST``, the newest ``online.publish_keep`` kept)
after each partition's last step, and every ``online.publish_every_steps`` global
steps if set (a fit interval ends there). Each version's ``version.json`` names
the ``partition``, its ``index`` and the global ``step``.

What is published already is the newest version's step (rank 0 reads it, every
rank is told): a stop at or before it is not published again, and a job resumed
from a checkpoint at a publish point past it (killed after the checkpoint,
before the version was renamed into place) publishes that checkpoint's model
first. So a resumed job publishes every partition trained to its end once,
unless the kill also lost a publish still in flight while it trained the next
partition past a checkpoint (that partition's model is gone; the next one is
published).

Example::

    publishing = FollowPublishing(cfg, built=s.built, stream=stream, run_dir=run_dir,
                                  is_main=True)
    for stop, publish in publishing.stops(step, stream.end_step): ...
    publishing.publish(step=stop, record=record)    # the partition's follow.jsonl record
    publishing.collect(records)                      # finished ones: publish_s
    summary.update(publishing.summary(records))      # "publish", "export"
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sharding.collectives import broadcast_object
from trainer.config.schema import Config
from trainer.online.partition_stream import PartitionStream
from trainer.online.publish import EXPORTS_DIR, VERSION_FILE, Publisher, versions
from trainer.online.snapshot import snapshot_export
from trainer.session import Built

log = logging.getLogger(__name__)


def published_step(directory: Path) -> int:
    """The global step of the newest version in ``directory`` (-1: none)."""
    found = versions(directory)
    if not found:
        return -1
    stamp = json.loads((directory / f"v{found[-1]}" / VERSION_FILE).read_text())
    return int(stamp.get("step", -1))


class FollowPublishing:
    """Publishes the follow job's model (see the module docstring); every rank has one."""

    def __init__(
        self, cfg: Config, *, built: Built, stream: PartitionStream, run_dir: Path, is_main: bool
    ) -> None:
        self.cfg = cfg
        self.built = built
        self.stream = stream
        self.is_main = is_main
        self.every = cfg.online.publish_every_steps
        self.publisher = Publisher(
            run_dir / EXPORTS_DIR,
            keep=cfg.online.publish_keep,
            active=is_main,
            timeout_s=cfg.online.publish_timeout_s,
        )
        # A resumed job's versions: rank 0 reads them, the snapshot is collective.
        self.published_step: int = broadcast_object(
            published_step(self.publisher.directory) if is_main else None
        )
        self.last: dict[str, Any] | None = None  # the newest version published by this job
        # This process's publishes (the records also hold a killed run's before it).
        self.count, self.blocked_s, self.publish_s, self.wall_s = 0, 0.0, 0.0, 0.0
        self.errors: list[str] = []
        self.shares: list[float] = []

    def stops(self, step: int, end: int) -> list[tuple[int, bool]]:
        """Where training from ``step`` to ``end`` stops, and whether it publishes there."""
        stops = (
            [*range((step // self.every + 1) * self.every, end, self.every)] if self.every else []
        )
        return [(stop, self.due(stop)) for stop in [*stops, end]]

    def due(self, step: int) -> bool:
        """Whether the model at ``step`` (a stop) is to be published: a partition's end
        or a multiple of ``publish_every_steps``, not published yet."""
        at_point = step == self.stream.end_step or bool(self.every and step % self.every == 0)
        return at_point and step > self.published_step

    def publish(self, *, step: int, record: dict[str, Any]) -> None:
        """Collective: waits for the publish in flight, snapshots (both on this thread:
        the blocked time), starts writing in the background; counts into ``record``.
        A partition with no eval rows publishes nothing (the bundle's sample and metrics
        are its eval rows'): the next partition's publish carries this model."""
        if not self.stream.source.num_eval_samples:  # the same partition on every rank
            record["publish_skipped"] = "no eval rows to score the bundle with"
            if self.is_main:
                log.warning(
                    "partition %s, step %d: not published (no eval rows); the next "
                    "partition's publish has this model",
                    self.stream.name,
                    step,
                )
            return
        start = time.perf_counter()
        waited = self.publisher.wait()
        stream = self.stream
        write = snapshot_export(
            self.built.model,
            model_config=self.cfg.model,
            converters=self.built.converters,
            tables=self.built.tables,
            source=stream.source,  # this partition's: a new partition opens a new one
            eval_batch_size=self.cfg.trainer.eval_batch_size,
            staging=self.publisher.directory / ".tmp-stage",
            data_config=self.cfg.data,  # described in the bundle's schema.json
        )
        if write is not None:
            info = {"step": step, "partition": stream.name, "index": stream.index}
            record["publish_version"] = f"v{self.publisher.start(write, info=info)}"
        self.published_step = step
        blocked = time.perf_counter() - start
        self.count += 1
        self.blocked_s += blocked
        record["publish_count"] = record.get("publish_count", 0) + 1
        record["publish_wait_s"] = record.get("publish_wait_s", 0.0) + waited
        record["publish_blocked_s"] = record.get("publish_blocked_s", 0.0) + blocked
        if self.is_main:
            log.info(
                "partition %s, step %d: publishing %s (blocked %.2fs, %.2fs of it waiting)",
                stream.name,
                step,
                record.get("publish_version"),
                blocked,
                waited,
            )

    def collect(self, records: list[dict[str, Any]]) -> bool:
        """Finished publishes into their partitions' records (``publish_s``,
        ``publish_error``); whether there were any."""
        finished = self.publisher.finished()
        for done in finished:
            record = next(r for r in records if r["index"] == done["info"]["index"])
            record["publish_s"] = record.get("publish_s", 0.0) + done["publish_s"]
            self.publish_s += done["publish_s"]
            if "error" in done:
                record["publish_error"] = done["error"]
                self.errors.append(done["error"])
            else:
                name = f"v{done['version']}"
                self.last = {**done["result"], "path": f"{EXPORTS_DIR}/{name}", "version": name}
        return bool(finished)

    def close(self, records: list[dict[str, Any]], *, within_s: float | None = None) -> float:
        """Waits for the publish in flight (a stopping job: at most ``within_s``) and
        collects it; returns the seconds waited."""
        waited = self.publisher.close(within_s=within_s)
        self.collect(records)
        return waited

    def partition_done(self, record: dict[str, Any], *, wall_s: float) -> None:
        """The partition's wall time in this process (evaluation, training, blocked time)
        and the blocked share of it, in its record."""
        record["partition_wall_s"] = wall_s
        self.wall_s += wall_s
        share = record.get("publish_blocked_s", 0.0) / max(wall_s, 1e-9)
        record["publish_share"] = share
        self.shares.append(share)

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Waits for the last publish; the summary's ``publish`` entry, this process's
        publishes (and ``export``: the newest version it published)."""
        final_wait_s = self.close(records)
        out: dict[str, Any] = {
            "publish": {
                "directory": EXPORTS_DIR,
                "latest": self.last["version"] if self.last else None,
                "count": self.count,
                "blocked_s": self.blocked_s,
                "partitions_wall_s": self.wall_s,  # the waits for new partitions left out
                "blocked_share": self.blocked_s / max(self.wall_s, 1e-9),
                "max_partition_share": max(self.shares, default=0.0),
                "publish_s": self.publish_s,
                "final_wait_s": final_wait_s,
                "errors": self.errors,
            }
        }
        if self.last is not None:
            out["export"] = self.last
        return out
