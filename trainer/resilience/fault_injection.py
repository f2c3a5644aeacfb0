"""Fault injection, for the tests only: real faults asked for through the environment.

- ``SHARDREC_FAULT_KILL_AT_STEP=k``: rank ``SHARDREC_FAULT_RANK`` (default 1;
  ``any``: every rank that has these variables) SIGKILLs itself after step
  ``k``, on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0);
- ``SHARDREC_FAULT_KILL_HOST_AT_STEP=k``: the same, but it SIGKILLs its torchrun
  agent (its parent) first: a lost host. Set on one agent's environment, with
  ``SHARDREC_FAULT_RANK=any``;
- ``SHARDREC_FAULT_RAISE_AT_STEP=k``: that rank raises ``RuntimeError`` after step ``k``;
- ``SHARDREC_FAULT_NAN_AT_STEP=k``: that rank's batch of step ``k`` gets NaN
  dense features (the other ranks' losses stay finite);
- ``SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP=k:PATH``: that rank (``any``: every rank)
  holds after step ``k`` until ``PATH`` exists or it receives SIGTERM/SIGUSR1, on
  the first attempt only. It sleeps in 0.1 s slices, so the preemption handler
  runs; a signal ends the hold and the loop then stops as preempted (checkpoint,
  exit 75) at its next agreement step: hold at a multiple of
  ``CHECK_EVERY_STEPS`` (10) to stop at the held step. A signal that came after
  the first step also ends a later hold at once. A test holds a tiny run's ranks
  while a node joins (a membership change keeps ``TORCHELASTIC_RESTART_COUNT``
  at 0, but the re-formed group resumes at or past ``k`` and does not hold again).

Nothing here runs unless a ``SHARDREC_FAULT_*`` variable is set; production code
only builds :meth:`FaultInjection.from_env` and hands it the batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


WAIT_ENV = "SHARDREC_FAULT_WAIT_FOR_FILE_AT_STEP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _env_wait() -> tuple[int, Path] | None:
    value = os.environ.get(WAIT_ENV)
    if not value:
        return None
    step, sep, path = value.partition(":")
    if not sep or not path or not step.strip().isdigit():
        raise ValueError(f"{WAIT_ENV}={value!r}: expected STEP:PATH, e.g. 20:/tmp/release")
    return int(step), Path(path)


@dataclasses.dataclass
class FaultInjection:
    """Faults asked for by ``SHARDREC_FAULT_*`` (see the module docstring); none by default."""

    rank: int
    kill_at_step: int | None = None
    kill_host_at_step: int | None = None
    raise_at_step: int | None = None
    nan_at_step: int | None = None
    wait_for_file: tuple[int, Path] | None = None  # (step, path)
    fault_rank: int | None = 1  # None: any rank
    _signalled: bool = False  # a stop signal arrived since the first step (wait only)
    _watching: bool = False

    @classmethod
    def from_env(cls, *, rank: int) -> FaultInjection:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        fault_rank = os.environ.get("SHARDREC_FAULT_RANK", "1")
        return cls(
            rank=rank,
            kill_at_step=_env_step("SHARDREC_FAULT_KILL_AT_STEP") if first_attempt else None,
            kill_host_at_step=(
                _env_step("SHARDREC_FAULT_KILL_HOST_AT_STEP") if first_attempt else None
            ),
            raise_at_step=_env_step("SHARDREC_FAULT_RAISE_AT_STEP") if first_attempt else None,
            nan_at_step=_env_step("SHARDREC_FAULT_NAN_AT_STEP"),
            wait_for_file=_env_wait() if first_attempt else None,
            fault_rank=None if fault_rank == "any" else int(fault_rank),
        )

    def _mine(self) -> bool:
        return self.fault_rank is None or self.rank == self.fault_rank

    def after_step(self, step: int) -> None:
        if not self._mine():
            return
        if self.wait_for_file is not None:
            self._watch_signals()
            if step == self.wait_for_file[0]:
                self._hold(step, self.wait_for_file[1])
        if step == self.kill_host_at_step:
            log.warning("fault injection: rank %d SIGKILLs its agent and itself", self.rank)
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.kill_at_step:
            log.warning("fault injection: rank %d SIGKILLs itself after step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.raise_at_step:
            raise RuntimeError(f"fault injection: rank {self.rank} fails after step {step}")

    def _watch_signals(self) -> None:
        """Chains onto the stop signals' handlers (the preemption's, installed by now)."""
        if self._watching or threading.current_thread() is not threading.main_thread():
            return
        self._watching = True
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)

            def chained(signum: int, frame: Any, previous: Any = previous) -> None:
                self._signalled = True
                if callable(previous):
                    previous(signum, frame)

            signal.signal(sig, chained)

    def _hold(self, step: int, path: Path) -> None:
        log.warning(
            "fault injection: rank %d waits at step %d for %s (or a stop signal)",
            self.rank,
            step,
            path,
        )
        while not self._signalled and not path.exists():
            time.sleep(0.1)  # a signal's handler runs between slices
        reason = "a stop signal" if self._signalled else f"{path} exists"
        log.warning("fault injection: rank %d goes on after step %d (%s)", self.rank, step, reason)

    def wrap_batches(self, batches: Iterator[Any], *, first_step: int) -> Iterator[Any]:
        """Steps ``first_step + 1, ...``'s batches; NaN dense features at ``nan_at_step``."""
        if self.nan_at_step is None or not self._mine():
            yield from batches
            return
        for step, batch in enumerate(batches, start=first_step + 1):
            if step == self.nan_at_step:
                batch.dense_features = torch.full_like(batch.dense_features, float("nan"))
            yield batch
