"""Poisoned steps (NaN/Inf): stop naming the step, or skip it on every rank together.

**Non-finite steps** (``trainer.on_nonfinite``):

- ``stop`` (default): each step's loss finiteness is recorded *on the device*
  (no host sync); the flag is read where the loop already syncs, at each log
  line (every ``LOG_EVERY_STEPS`` and at every interval end, which is before
  any checkpoint). A poisoned step raises :class:`NonfiniteError` naming the
  step and the last good checkpoint. A non-finite gradient with a finite loss
  poisons the weights, so the next step's loss names it (one step late).
- ``skip``: one all-reduce (MAX) per training step, between forward and
  backward, so every rank agrees. A poisoned step then backpropagates a zero
  loss built from the dense parameters only (the tables' fused kernels see no
  gradient, so they do not move) and :class:`SkippingOptimizer` drops the
  dense optimizer step. Skipped steps are counted (``nonfinite_steps_skipped``).

Whatever the policy, :func:`check_finite_state` runs before every checkpoint,
so a checkpoint is never written from non-finite weights.

Example::

    guard = NonfiniteGuard(policy="skip", model=dmp, device=env.device)
    optimizer = guard.wrap_optimizer(optimizer)
    pipeline = make_pipeline(..., model_fwd=guard.wrap_forward(dmp, fwd))
    for loss, _, _ in drain(pipeline, faults.wrap_batches(batches, first_step=step)):
        step += 1
        counted = guard.observe(loss, step=step)   # False: this step was skipped
        guard.check(step=step)                      # at a log line: raises if poisoned
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.nn.parallel import DistributedDataParallel

from sharding.collectives import any_rank

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
Forward = Callable[[Any], Any]


class NonfiniteError(RuntimeError):
    """A NaN/Inf loss or weight: the run stops, naming the step and the last good checkpoint."""


def _last_good(checkpoint_dir: Path | None) -> str:
    from trainer.checkpoint.load import complete_checkpoints  # avoid an import cycle

    found = complete_checkpoints(checkpoint_dir) if checkpoint_dir else []
    if not found:
        return "no checkpoint was written; fix the cause and start again"
    return (
        f"the last good checkpoint is {found[-1]} (trainer.resume=auto resumes from it; "
        f"trainer.on_nonfinite=skip skips such steps)"
    )


class NonfiniteGuard:
    """Detects non-finite losses (and stops or skips, see the module docstring)."""

    def __init__(
        self,
        *,
        policy: str,
        model: nn.Module,
        device: torch.device,
        checkpoint_dir: Path | None = None,
        before_stop: Callable[[], None] | None = None,
    ) -> None:
        """``before_stop``: collective, called before raising (finishes a save in flight)."""
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite={policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self.model = model
        self.checkpoint_dir = checkpoint_dir
        self.before_stop = before_stop
        # Device-side: the first step whose loss was not finite (-1: none).
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.num_skipped = 0
        self._skip_pending = False  # the step in flight was poisoned: drop its optimizer step
        self._last_skipped = False

    # -- skip: agree between forward and backward -------------------------------------
    def wrap_forward(self, model: nn.Module, forward: Forward | None) -> Forward | None:
        """The pipeline's forward; under ``skip`` it agrees on finiteness (one all-reduce)."""
        if self.policy != "skip":
            return forward
        inner = forward or model

        def guarded(batch: Any) -> Any:
            loss, output = inner(batch)
            if not model.training:
                return loss, output
            bad = any_rank((~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1))
            self._last_skipped = self._skip_pending = bool(bad.item())  # host sync
            if self._skip_pending:
                return self._zero_loss(loss), output
            return loss, output

        return guarded

    def _zero_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # Zero gradients for the dense (DDP) parameters, so DDP's reducer completes on
        # every rank; the tables' output is not in this graph, so their fused
        # optimizer is not called. 0 * NaN is NaN, hence a graph without the batch.
        params = [
            p
            for m in self.model.modules()
            if isinstance(m, DistributedDataParallel)
            for p in m.parameters()
            if p.requires_grad
        ]
        zero = torch.zeros((), device=loss.device, dtype=loss.dtype)
        for p in params:
            zero = zero + p.reshape(-1)[:1].sum().to(loss.dtype) * 0.0
        return zero

    def wrap_optimizer(self, optimizer: Any) -> Any:
        return SkippingOptimizer(optimizer, self) if self.policy == "skip" else optimizer

    # -- both: the loop's view ---------------------------------------------------------
    def observe(self, loss: torch.Tensor, *, step: int) -> bool:
        """Records step ``step``'s loss; False if the step was skipped (do not count it)."""
        if self.policy == "skip":
            if self._last_skipped:
                self.num_skipped += 1
                log.warning("step %d: non-finite loss on some rank; step skipped", step)
                self._last_skipped = False
                return False
            return True
        bad = ~torch.isfinite(loss.detach()).all()
        first = self._first_bad
        first.copy_(torch.where(bad & (first < 0), torch.full_like(first, step), first))
        return True

    def check(self, *, step: int) -> None:
        """At a log line (already a sync point): raises if a step since the last was poisoned."""
        if self.policy == "skip":
            return
        # -1 means none: the max over ranks of a "bad step" (or -1 everywhere).
        bad_step = int(any_rank(self._first_bad.clone()))
        if bad_step >= 0:
            if self.before_stop is not None:  # every rank is here: the all-reduce agreed
                self.before_stop()
            raise NonfiniteError(
                f"non-finite loss (NaN/Inf) at step {bad_step} (detected at step {step}); "
                f"the run stops (trainer.on_nonfinite=stop); {_last_good(self.checkpoint_dir)}"
            )


class SkippingOptimizer:
    """The pipeline's optimizer: ``step()`` does nothing for a step the guard skipped."""

    def __init__(self, optimizer: Any, guard: NonfiniteGuard) -> None:
        self._optimizer = optimizer
        self._guard = guard

    def step(self, closure: Any = None) -> Any:
        if self._guard._skip_pending:
            self._guard._skip_pending = False
            return None
        return self._optimizer.step(closure) if closure is not None else self._optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


def _local_tensors(state: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in state.values():
        if isinstance(value, ShardedTensor):
            yield from (shard.tensor for shard in value.local_shards())
        elif hasattr(value, "to_local"):  # DTensor
            yield value.to_local()
        elif isinstance(value, torch.Tensor):
            yield value


def check_finite_state(
    model: nn.Module,
    *,
    step: int,
    checkpoint_dir: Path | None,
    before_stop: Callable[[], None] | None = None,
) -> None:
    """Collective: raises :class:`NonfiniteError` if any rank's weights hold NaN/Inf.

    One pass over the local shards and one all-reduce: cheap beside a save.
    """
    bad = torch.zeros(1, dtype=torch.float32)
    for tensor in _local_tensors(model.state_dict()):
        if tensor.is_floating_point() and tensor.numel():
            bad = torch.maximum(bad, (~torch.isfinite(tensor)).any().float().cpu().reshape(1))
    if any_rank(bad).item():
        if before_stop is not None:
            before_stop()
        raise NonfiniteError(
            f"the weights hold NaN/Inf at step {step}; no checkpoint written from them; "
            f"{_last_good(checkpoint_dir)}"
        )
