"""The day walk: one job trains a model day after day on a drifting stream.

``python -m trainer online.days=N data.days=N`` (``train()`` hands over here)
walks days ``0 .. N-1`` of the drifting synthetic stream (trainer/data/drift.py)
with one model, one optimizer, one plan. For day ``t``:

1. switch the source to day ``t`` (:class:`trainer.online.stream.DayStream`);
2. evaluate the model trained so far on day ``t``'s eval set: the next-day AUC,
   NE, calibration and the gap to day ``t``'s oracle AUC and to its knowable
   oracle (the best a model of the days before can do: trainer/online/knowable.py),
   also on the samples with only seen ids and on those with new ids, one record
   in ``days.jsonl`` (trainer/online/report.py);
3. train ``online.steps_per_day`` steps on day ``t`` (day 0:
   ``online.first_day_steps``, when set) with the same ``Trainer``
   (trainer/loop/trainer.py; its ``num_steps`` moved to the day's last step),
   which evaluates on day ``t`` at its end and checkpoints (at least at each
   day's end: ``trainer.checkpoint_every_steps``, else ``online.steps_per_day``);
4. with ``online.publish``, publish the serving bundle (trainer/online/publish.py:
   ``exports/v<k>/`` and ``exports/LATEST``, written in the background) at the
   day's end or every ``online.publish_every_steps`` steps (a fit interval ends
   there: it evaluates and checkpoints as at a day's end); the day's record then
   gets ``publish_version``, ``publish_count``, ``publish_blocked_s`` (the
   training thread's time: the snapshot and any wait for the previous publish),
   ``publish_s`` (the background's time, filled in once done), ``day_wall_s``
   and ``publish_share`` (blocked over the day's wall time). Without it,
   ``trainer.export`` exports to ``days/day_<t>/`` on the training thread.

Steps are global: day 0 trains steps ``0 .. F`` (``F`` =
``online.first_day_steps``, the history the walk starts from; 0: ``S``) and day
``t`` > 0 steps ``F + (t - 1) * S .. F + t * S`` (``S`` =
``online.steps_per_day``), until ``trainer.num_steps`` steps are done
(:func:`day_end`); the days after are only evaluated, so
``trainer.num_steps=F`` is the frozen baseline (trained on day 0, evaluated on
the others). The checkpoint's ``data`` entry
holds the day (``DayStream``), so ``trainer.resume=auto`` after a kill goes on
from the checkpoint's step and day: the rest of that day's training, or the
next day. At the end: the per-day table (printed), ``days.png`` and
``summary.json``, whose ``auc``, ``ne``, ``calibration``, ``logloss``,
``oracle_auc`` and ``oracle_gap`` are means over days 1 .. N-1 of the next-day
figures (``train_day_auc``: the last trained day's own eval after training).

Example::

    summary = walk(cfg, run_dir=Path("outputs/drift"))   # cfg.online.days = 7
    summary["oracle_gap"]                                 # mean over days 1..6
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from trainer.config.schema import Config, OnlineConfig
from trainer.config.validate import open_source
from trainer.export.step import export_step
from trainer.loop.trainer import Trainer
from trainer.online import knowable, report
from trainer.online.publish import EXPORTS_DIR, Publisher
from trainer.online.snapshot import snapshot_export
from trainer.online.stream import DayStream
from trainer.session import Built, session

log = logging.getLogger(__name__)

# An eval's figures: in the summary they are the next-day means, not the last eval's.
_EVAL_KEYS = ("auc", "logloss", "ne", "calibration", "ctr", "num_samples")
# A day's reference figures, also as means over days 1 .. N-1 in the summary.
_DAY_KEYS = ("oracle_auc", "knowable_auc", "knowable_gap", "auc_seen_ids", "auc_new_ids")


def day_end(online: OnlineConfig, *, num_steps: int, day: int) -> int:
    """The global step after day ``day``'s training: day 0 trains
    ``online.first_day_steps`` steps (0: ``online.steps_per_day``), each later day
    ``online.steps_per_day``, the walk ``num_steps`` at most."""
    first = online.first_day_steps or online.steps_per_day
    budget = min(num_steps, first + (online.days - 1) * online.steps_per_day)
    return min(first + day * online.steps_per_day, budget)


def walk(cfg: Config, *, run_dir: Path) -> dict[str, Any]:
    """Runs the day walk (``cfg.online.days`` > 0); returns the summary (also in
    ``summary.json``). The same session as ``trainer.train.train``, around :class:`DayWalk`."""
    stream = DayStream(cfg.data, first=open_source(cfg.data, seed=cfg.trainer.seed))
    every = cfg.trainer.checkpoint_every_steps or cfg.online.steps_per_day  # each day's end
    with session(cfg, run_dir=run_dir, source=stream, checkpoint_every_steps=every) as s:
        days = DayWalk(cfg, trainer=s.trainer, stream=stream, built=s.built, run_dir=s.run_dir)
        if s.resume() is not None:  # the step and the day
            days.resumed()
            if s.env.is_main:
                log.info("resumed at day %d", stream.day)
        return s.finish(days.run(extra=s.extra()))


class DayWalk:
    """Evaluate-then-train over the days, with one ``Trainer`` (see the module docstring)."""

    def __init__(
        self, cfg: Config, *, trainer: Trainer, stream: DayStream, built: Built, run_dir: Path
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.stream = stream
        self.built = built
        self.run_dir = run_dir
        self.is_main = trainer.env.is_main
        self.records: list[dict[str, Any]] = []
        self.first_day = 0
        self.evaluated = -1  # a day whose record exists already (a resume mid-day)
        self.is_resumed = False
        o = cfg.online
        self.publisher = (
            Publisher(
                run_dir / EXPORTS_DIR,
                keep=o.publish_keep,
                active=self.is_main,
                timeout_s=o.publish_timeout_s,
            )
            if o.publish
            else None
        )
        self.last_published: dict[str, Any] | None = None

    def day_end(self, day: int) -> int:
        """The global step after day ``day``'s training."""
        return day_end(self.cfg.online, num_steps=self.cfg.trainer.num_steps, day=day)

    def resumed(self) -> None:
        """After a checkpoint was loaded: go on with its day, or the next one when its
        training was complete; days after it are evaluated again."""
        day, step = self.stream.day, self.trainer.step
        self.is_resumed = True
        self.records = report.restore_records(self.run_dir, last_day=day, write=self.is_main)
        if step >= self.day_end(day):
            self.first_day = day + 1
        else:
            self.first_day, self.evaluated = day, day

    def run(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Walks the days; returns the summary."""
        t, s = self.trainer, self.cfg.trainer
        first_step, export = t.step, None
        last_fit: dict[str, Any] = {}
        if self.is_main and not self.is_resumed:  # a fresh walk: a fresh file
            (self.run_dir / report.DAYS_FILE).write_text("")
        walk_start = time.perf_counter()
        try:
            for day in range(self.first_day, self.cfg.online.days):
                day_start = time.perf_counter()
                self.stream.set_day(day)
                end = self.day_end(day)
                if day != self.evaluated:
                    self._evaluate(day, steps=max(end - t.step, 0))
                if t.step >= end:
                    continue
                for stop, publish in self._stops(t.step, end):
                    t.settings = dataclasses.replace(s, num_steps=stop)  # this day's last step
                    last_fit = t.fit(extra=extra)
                    if publish:
                        self._publish(day)
                if self.publisher is not None:
                    self._day_published(day, wall_s=time.perf_counter() - day_start)
                elif s.export:
                    export = self._export(day)
        except BaseException:  # e.g. preempted: the publish in flight lands, or is cut
            if self.publisher is not None:
                self.publisher.close(within_s=self.cfg.online.publish_stop_wait_s)
            raise
        walk_s = time.perf_counter() - walk_start
        if not last_fit:  # nothing trained in this process: report the model as it is
            last_fit = t.summarise({**t.evaluate(), **extra})
        trained_s = max(t.train_time_s, 1e-9)
        summary = {k: v for k, v in last_fit.items() if k not in _EVAL_KEYS}
        later = report.next_days(self.records)
        summary.update(
            {
                **{key: report.mean_of(later, key) for key in (*_EVAL_KEYS[:4], *_DAY_KEYS)},
                "oracle_gap": report.mean_gap(self.records),
                "train_day_auc": last_fit.get("auc"),
                "days": self.cfg.online.days,
                "steps": t.step,
                "samples_per_sec": (t.step - first_step)
                * s.batch_size
                * t.env.world_size
                / trained_s,
                "step_time_s": trained_s / max(t.step - first_step, 1),
            }
        )
        if export is not None:
            summary["export"] = export
        if self.publisher is not None:
            summary.update(self._publish_summary(walk_s))
        if self.is_main:
            print(f"\nday walk ({self.run_dir / report.DAYS_FILE}):")
            print(report.format_table(self.records))
            if s.plot and self.records:
                report.plot_days(self.records, self.run_dir / report.DAYS_PLOT)
        return summary

    def _evaluate(self, day: int, *, steps: int) -> None:
        """Day ``day``'s record: the model so far on its eval set, before training on it;
        the day's oracle and knowable oracle (trainer/online/knowable.py), and the
        model's AUC on the samples with only seen ids and on those with new ids."""
        metrics = self.trainer.evaluate()
        figures, new = knowable.day_figures(self.stream.source)
        oracle = figures["oracle_auc"]  # the source's reference_metrics(), computed anew
        record = {
            "day": day,
            "step": self.trainer.step,
            "steps": steps,
            **{key: metrics[key] for key in _EVAL_KEYS[:5]},
            "oracle_auc": oracle,
            "oracle_gap": oracle - metrics["auc"],
            "knowable_auc": figures["knowable_auc"],
            "knowable_gap": figures["knowable_auc"] - metrics["auc"],
        }
        for part, mask in (("seen_ids", ~new), ("new_ids", new)):
            if f"oracle_auc_{part}" not in figures:  # no AUC on it (day 0: no seen ids)
                continue
            if bool(mask.all()):
                record[f"auc_{part}"] = metrics["auc"]
            else:
                with self.stream.eval_only(mask.nonzero().squeeze(1)):
                    record[f"auc_{part}"] = self.trainer.evaluate()["auc"]
            for name in ("oracle_auc", "knowable_auc"):
                record[f"{name}_{part}"] = figures[f"{name}_{part}"]
        record["new_id_samples"] = figures["new_id_samples"]
        self.records.append(record)
        if self.is_main:
            report.append_record(self.run_dir, record)
            log.info(
                "day %d: auc %.4f (oracle %.4f, knowable %.4f) before %d steps on it",
                day,
                metrics["auc"],
                oracle,
                figures["knowable_auc"],
                steps,
            )

    def _stops(self, step: int, end: int) -> list[tuple[int, bool]]:
        """Where day training from ``step`` to ``end`` stops, and whether it publishes there."""
        every = self.cfg.online.publish_every_steps if self.publisher is not None else 0
        if not every:
            return [(end, self.publisher is not None)]
        stops = [*range((step // every + 1) * every, end, every), end]
        return [(stop, stop % every == 0) for stop in stops]

    def _publish(self, day: int) -> None:
        """Collective: the snapshot on this thread (timed: the blocked part), the rest
        in the background; waits first for a publish still in flight."""
        assert self.publisher is not None
        start = time.perf_counter()
        waited = self.publisher.wait()
        write = snapshot_export(
            self.built.model,
            model_config=self.cfg.model,
            converters=self.built.converters,
            tables=self.built.tables,
            source=self.stream.source,  # this day's: it stays as it is (a new day: a new one)
            eval_batch_size=self.cfg.trainer.eval_batch_size,
            staging=self.publisher.directory / ".tmp-stage",
            data_config=self.cfg.data,  # described in the bundle's schema.json
        )
        record = self._record(day)
        if write is not None:
            version = self.publisher.start(write, info={"step": self.trainer.step, "day": day})
            record["publish_version"] = f"v{version}"
        record["publish_count"] = record.get("publish_count", 0) + 1
        record["publish_wait_s"] = record.get("publish_wait_s", 0.0) + waited
        blocked = time.perf_counter() - start
        record["publish_blocked_s"] = record.get("publish_blocked_s", 0.0) + blocked
        if self.is_main:
            log.info(
                "day %d, step %d: publishing %s (blocked %.2fs, %.2fs of it waiting)",
                day,
                self.trainer.step,
                record.get("publish_version"),
                blocked,
                waited,
            )

    def _day_published(self, day: int, *, wall_s: float) -> None:
        """The day's wall time and blocked share in its record; the publishes done so far."""
        record = self._record(day)
        record["day_wall_s"] = wall_s
        record["publish_share"] = record.get("publish_blocked_s", 0.0) / max(wall_s, 1e-9)
        self._collect()

    def _collect(self) -> None:
        """Finished publishes into their days' records (``publish_s``); rewrites days.jsonl."""
        assert self.publisher is not None
        for done in self.publisher.finished():
            record = self._record(done["info"]["day"])
            record["publish_s"] = record.get("publish_s", 0.0) + done["publish_s"]
            if "error" in done:
                record["publish_error"] = done["error"]
            else:
                name = f"v{done['version']}"
                self.last_published = {**done["result"], "path": f"{EXPORTS_DIR}/{name}"}
                self.last_published["version"] = name
        if self.is_main:  # replaced whole, as report.restore_records does
            tmp = self.run_dir / f".{report.DAYS_FILE}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.run_dir / report.DAYS_FILE)

    def _record(self, day: int) -> dict[str, Any]:
        return next(r for r in self.records if r["day"] == day)

    def _publish_summary(self, walk_s: float) -> dict[str, Any]:
        """Waits for the last publish; the summary's ``publish`` entry (and ``export``:
        the last version published)."""
        assert self.publisher is not None
        final_wait_s = self.publisher.close()
        self._collect()
        published = [r for r in self.records if "publish_count" in r]
        blocked = sum(r["publish_blocked_s"] for r in published)
        out: dict[str, Any] = {
            "publish": {
                "directory": EXPORTS_DIR,
                "latest": self.last_published["version"] if self.last_published else None,
                "count": sum(r["publish_count"] for r in published),
                "blocked_s": blocked,
                "walk_s": walk_s,
                "blocked_share": blocked / max(walk_s, 1e-9),
                "max_day_share": max((r["publish_share"] for r in published), default=0.0),
                "publish_s": sum(r.get("publish_s", 0.0) for r in published),
                "final_wait_s": final_wait_s,
                "errors": [r["publish_error"] for r in published if "publish_error" in r],
            }
        }
        if self.last_published is not None:
            out["export"] = self.last_published
        return out

    def _export(self, day: int) -> dict[str, Any]:
        """Collective: the serving bundle of the model after day ``day``."""
        out = self.run_dir / "days" / f"day_{day}"
        out.mkdir(parents=True, exist_ok=True)
        result = export_step(
            self.built.model,
            model_config=self.cfg.model,
            converters=self.built.converters,
            tables=self.built.tables,
            source=self.stream.source,
            eval_batch_size=self.cfg.trainer.eval_batch_size,
            run_dir=out,
        )
        if isinstance(result, dict) and isinstance(result.get("path"), str):
            result = {**result, "path": str(out.relative_to(self.run_dir) / result["path"])}
        return result
