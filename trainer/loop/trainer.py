"""The training loop: train N steps, evaluate, log, repeat; then summarise.

One torchrec train pipeline drives both phases. ``TrainPipelineSparseDist``
starts batch i+1's input distribution (the KJT all-to-all) while batch i runs
forward and backward; on CUDA it also copies batch i+2 on a side stream. On CPU
the same pipeline runs without streams. Each training interval is its own
finite iterator, so the pipeline drains before evaluation and the eval batches
go through it in eval mode (forward only: the pipeline skips backward and the
optimizer step when ``model.training`` is False). Checkpoints are saved between
intervals too, with nothing in flight.

Example::

    trainer = Trainer(model=dmp, optimizer=opt, env=env, source=source,
                      settings=cfg.trainer, logger=logger, run_dir=run_dir)
    summary = trainer.fit()     # train_loss, eval metrics, samples/s, reference metrics

The Trainer is a DCP ``Stateful`` (its step); a checkpoint holds it beside the
model, the optimizer, the data source and ``extra_states`` (the converters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from tqdm import tqdm

from sharding import DistEnv
from sharding.collectives import any_rank, global_mean
from sharding.dmp import DenseLRSchedule
from trainer.checkpoint.load import ModelState, OptimizerState
from trainer.checkpoint.save import Checkpointer
from trainer.config.schema import TrainConfig
from trainer.data.loader import eval_slices
from trainer.data.prefetch import input_ahead
from trainer.data.source import DataSource
from trainer.loop.train_pipeline import drain, make_pipeline
from trainer.report.logger import MetricsLogger
from trainer.report.metrics import EvalMetrics
from trainer.report.plots import plot_curves
from trainer.resilience.fault_injection import FaultInjection
from trainer.resilience.nonfinite import NonfiniteGuard, check_finite_state
from trainer.resilience.preempt import Preemption

LOG_EVERY_STEPS = 25
# What evaluate() reports besides num_samples (EvalMetrics.compute's figures).
_EVAL_FIGURES = ("auc", "logloss", "ne", "calibration", "ctr")


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        env: DistEnv,
        source: DataSource,
        settings: TrainConfig,
        logger: MetricsLogger,
        run_dir: Path,
        model_fwd: Callable[[Any], Any] | None = None,
        checkpointer: Checkpointer | None = None,
        extra_states: dict[str, Stateful] | None = None,
        preemption: Preemption | None = None,
        nonfinite: NonfiniteGuard | None = None,
        faults: FaultInjection | None = None,
        on_eval: Callable[[int, dict[str, float]], str | None] | None = None,
        lr_schedule: DenseLRSchedule | None = None,
    ) -> None:
        # Called on rank 0 after each eval before the last (step, metrics); a reason
        # string ends the run there (e.g. a search pruned the trial: trainer/search.py).
        self.on_eval = on_eval
        self.stopped_early: str | None = None
        self.preemption = preemption  # SIGUSR1/SIGTERM: checkpoint and exit 75 (preempt.py)
        self.model = model
        self.optimizer = optimizer
        self.checkpointer = checkpointer
        self.env = env
        self.source = source
        self.settings = settings
        self.logger = logger
        self.run_dir = run_dir
        # NaN/Inf policy (trainer/resilience/nonfinite.py): under skip it wraps the
        # forward and optimizer.
        self.nonfinite = nonfinite or NonfiniteGuard(policy="stop", model=model, device=env.device)
        self.faults = faults or FaultInjection(rank=env.rank)
        self.pipeline = make_pipeline(
            settings.pipeline,
            model,
            self.nonfinite.wrap_optimizer(optimizer),
            env.device,
            model_fwd=self.nonfinite.wrap_forward(model, model_fwd),
        )
        self.records: list[dict[str, Any]] = []
        self.step = 0  # set by a resume before fit()
        self.first_step = 0  # where this process started (samples/s counts from here)
        self.train_time_s = 0.0
        self.status: dict[str, str] = {}  # what the progress bar shows
        self.extra_states = dict(extra_states or {})
        # The dense rate, a function of self.step (stepped after each step; seeks on resume).
        self.lr_schedule = lr_schedule

    def states(self) -> dict[str, Stateful]:
        """Everything a checkpoint holds, each a DCP ``Stateful``."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.optimizer),
            "trainer": self,
            "data": self.source,
            **self.extra_states,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        # A tensor, so DCP treats it like the weights (a replicated tensor).
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        if self.lr_schedule is not None:
            self.lr_schedule.seek(self.step)

    def fit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Trains to ``num_steps``, evaluating every ``eval_every_steps`` and at the end.

        Checkpoints (if on) every ``checkpoint_every_steps`` and at the end. Intervals
        end on multiples of both, counted from step 0, so a resumed run trains,
        evaluates and logs at the same steps as one that never stopped.
        ``extra`` goes into the summary as it is (strategy, bytes per rank, ...).
        """
        s = self.settings
        self.first_step = self.step
        bar = tqdm(
            initial=self.step,
            total=s.num_steps,
            disable=not (self.env.is_main and s.progress_bar),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last_eval: dict[str, float] = {}
        while self.step < s.num_steps:
            self.train_steps(self._next_stop() - self.step, bar)
            saved = None
            if self.step % s.eval_every_steps == 0 or self.step == s.num_steps:
                last_eval = self.evaluate()
                self.log({"step": self.step, **last_eval})
                self.status["auc"] = f"{last_eval['auc']:.4f}"
                bar.set_postfix(self.status, refresh=True)
                if self.step < s.num_steps and self._stop_after_eval(last_eval):
                    break
            if self.checkpointer and self.checkpointer.due(self.step, num_steps=s.num_steps):
                check_finite_state(
                    self.model,
                    step=self.step,
                    checkpoint_dir=self.checkpointer.directory,
                    before_stop=self.checkpointer.wait,
                )
                saved = self.checkpointer.save(step=self.step, states=self.states())
            # A stop asked for during the interval is honoured here, after its end's
            # eval and checkpoint, so a requeued run logs every eval of one that never
            # stopped (train_steps leaves the interval's last step to this check).
            if (
                self.preemption is not None
                and self.step < s.num_steps
                and self.preemption.should_stop(self.step)
            ):
                self.preemption.checkpoint_and_exit(self, saved=saved)
        if self.checkpointer:
            self.checkpointer.wait()  # an async save in flight finishes before the summary
        if not last_eval:  # resumed from the last step: nothing trained, still report
            last_eval = self.evaluate()
        bar.close()
        return self.summarise({**last_eval, **(extra or {})})

    def _stop_after_eval(self, metrics: dict[str, float]) -> bool:
        """Whether ``on_eval`` (asked on rank 0, agreed by all ranks) ends the run here."""
        if self.on_eval is None:
            return False
        reason = self.on_eval(self.step, metrics) if self.env.is_main else None
        flag = torch.tensor([int(reason is not None)], device=self.env.device)
        if not int(any_rank(flag, group=self.env.pg).item()):
            return False
        self.stopped_early = reason or "stopped by rank 0's on_eval"
        return True

    def _next_stop(self) -> int:
        """The next step that ends an interval: eval, checkpoint or the last step."""
        s = self.settings
        every = [s.eval_every_steps]
        if self.checkpointer and self.checkpointer.every_steps:
            every.append(self.checkpointer.every_steps)
        return min([s.num_steps] + [(self.step // n + 1) * n for n in every])

    def train_steps(self, num_steps: int, bar: tqdm) -> None:
        self.model.train()
        batches = self.source.train_batches(
            batch_size=self.settings.batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            first_step=self.step,
            num_steps=num_steps,
        )
        # Built ahead on a thread (pinned, for a GPU fed from host memory), then the
        # test-only faults, at the step that reads the batch.
        with input_ahead(batches, mode=self.settings.prefetch, device=self.env.device) as ahead:
            batches = self.faults.wrap_batches(ahead, first_step=self.step)
            self._train_on(batches, num_steps, bar)

    def _train_on(self, batches: Iterator[Any], num_steps: int, bar: tqdm) -> None:
        # Summed on device and read once per log line: .item() is a host sync point.
        loss_sum = torch.zeros((), device=self.env.device)
        loss_count = 0
        start, last_step = time.perf_counter(), self.step + num_steps
        for loss, _logits, _labels in drain(self.pipeline, batches):
            self.step += 1
            if self.lr_schedule is not None:
                self.lr_schedule.step()
            if self.nonfinite.observe(loss, step=self.step):  # device-side, no sync
                loss_sum += loss
                loss_count += 1
            bar.update(1)
            self.faults.after_step(self.step)
            # Windows end on multiples of LOG_EVERY_STEPS and at the interval's end,
            # whatever step this process started from.
            if self.step % LOG_EVERY_STEPS == 0 or self.step == last_step:
                self.nonfinite.check(step=self.step)  # raises on a poisoned step
                train_loss = global_mean(loss_sum / max(loss_count, 1))
                elapsed = self.train_time_s + time.perf_counter() - start
                self.log({"step": self.step, "train_loss": train_loss})
                self.status["loss"] = f"{train_loss:.4f}"
                samples = self._samples(self.step - self.first_step)
                self.status["samples/s"] = f"{samples / elapsed:,.0f}"
                bar.set_postfix(self.status, refresh=False)
                loss_sum.zero_()
                loss_count = 0
            if (
                self.preemption is not None
                and self.step != last_step  # the interval's end: fit() checks, after eval
                and self.preemption.should_stop(self.step)
            ):
                self.preemption.checkpoint_and_exit(self)
        self.train_time_s += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """AUC, log loss, NE and calibration over the whole eval set, all ranks (NaN
        where undefined: one class, or no eval rows at all)."""
        replica_sync = getattr(self.optimizer, "replica_sync", None)
        if replica_sync is not None:  # synced every N > 1 steps: evaluate (and export) the mean
            replica_sync.flush()
        self.model.eval()
        s = self.settings
        slices = eval_slices(
            self.source.num_eval_samples,
            batch_size=s.eval_batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        if not slices:  # no eval rows (follow mode's quiet partition): every figure undefined
            return {**dict.fromkeys(_EVAL_FIGURES, math.nan), "num_samples": 0.0}

        # One EvalMetrics per head: a model whose logits are a dict of named heads
        # (a distillation pair: student, teacher) reports each, the first also plain.
        def new_metrics() -> EvalMetrics:
            return EvalMetrics(
                rank=self.env.rank,
                world_size=self.env.world_size,
                batch_size=s.eval_batch_size,
                num_samples=self.env.world_size * sum(size for _, size in slices),
                device=self.env.device,
            )

        metrics: dict[str, EvalMetrics] = {}
        batches = self.source.eval_batches(
            batch_size=s.eval_batch_size, rank=self.env.rank, world_size=self.env.world_size
        )
        for _loss, logits, labels in drain(self.pipeline, batches):
            heads = logits if isinstance(logits, dict) else {"": logits}
            for head, head_logits in heads.items():
                if head not in metrics:
                    metrics[head] = new_metrics()
                metrics[head].update(logits=head_logits, labels=labels)
        self.model.train()
        results = {head: m.compute() for head, m in (metrics or {"": new_metrics()}).items()}
        first = next(iter(results.values()))
        named = {f"{h}.{k}": v for h, r in results.items() if h for k, v in r.items()}
        for head in list(results)[1:]:
            self.status[f"{head}.auc"] = f"{results[head]['auc']:.4f}"
        return {**first, **named}

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.logger.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def summarise(self, last_eval: dict[str, float]) -> dict[str, Any]:
        """The run's figures (train.py writes summary.json once, after the export)."""
        summary = {
            **last_eval,
            **self.source.reference_metrics(),  # oracle_auc for planted data
            "steps": self.step,
            "world_size": self.env.world_size,
            "global_batch_size": self.settings.batch_size * self.env.world_size,
            "samples_per_sec": self._samples(self.step - self.first_step)
            / max(self.train_time_s, 1e-9),
            "train_time_s": self.train_time_s,
            # Wall time per step of this process (a distillation run's is the pair's
            # step: compare with a teacher-alone run, as benchmarks/studies/distill.py does).
            "step_time_s": self.train_time_s / max(self.step - self.first_step, 1),
            "device": str(self.env.device),
            "nonfinite_steps_skipped": self.nonfinite.num_skipped,
        }
        if self.stopped_early is not None:
            summary["stopped_early"] = self.stopped_early
        train_losses = [r["train_loss"] for r in self.records if "train_loss" in r]
        if train_losses:
            summary["final_train_loss"] = train_losses[-1]
        if self.env.is_main and self.settings.plot:
            plot_curves(
                self.records, self.run_dir / "curves.png", oracle_auc=summary.get("oracle_auc")
            )
        return summary

    def _samples(self, steps: int) -> int:
        return steps * self.settings.batch_size * self.env.world_size
