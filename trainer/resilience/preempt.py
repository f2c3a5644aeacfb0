"""Stopping cleanly when asked: finish the step, save a checkpoint, exit with 75.

SLURM warns a job before its time limit (``#SBATCH --signal=B:USR1@90``) and
sends SIGTERM on ``scancel`` or preemption; ``scripts/slurm/train.sbatch`` traps
the warning and forwards a SIGTERM to the training processes. Here SIGUSR1 and
SIGTERM only set a flag. After each step the loop asks :meth:`Preemption.should_stop`,
every 10th step a one-element all-reduce (MAX), so that every rank stops after the
same step even if only one was signalled; then :meth:`Preemption.checkpoint_and_exit` saves a
checkpoint and raises :class:`Preempted`, a ``SystemExit`` with
``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: try again). The batch script
requeues the job, which resumes from that checkpoint with ``trainer.resume=auto``.

A signal that arrives again while stopping is ignored (torchrun and SLURM may
both forward one); SIGINT is left alone, so Ctrl-C still stops at once.

**A rank stuck in a collective** cannot stop that way: Python runs a signal's
handler only between bytecodes, and a rank blocked inside a collective whose
peer has died (torchrun SIGTERMs the survivors when a worker fails; ``srun
--kill-on-bad-exit`` does the same) never gets there. torchrun then waits its
30 s grace and SIGKILLs it, which delays the restart by those 30 s (on NCCL a
dead peer is not even reported). So a watchdog thread sees each SIGTERM as it
arrives (``signal.set_wakeup_fd``, written by Python's C-level handler even
while the main thread is blocked); if the main thread has not run the handler
:data:`BLOCKED_EXIT_S` later, the process exits at once with ``128 + signal``
(143 for SIGTERM): there is no step to finish, and the run resumes from its
last checkpoint. A healthy rank runs the handler within a step (milliseconds).

Example::

    with Preemption(device=env.device, world_size=env.world_size) as preemption:
        trainer = Trainer(..., preemption=preemption)
        trainer.fit()        # on SIGUSR1/SIGTERM: checkpoint, raise Preempted (exit 75)
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import Any, Protocol

import torch

from sharding.collectives import any_rank

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """What a preemption needs of the loop (``trainer.loop.Trainer``)."""

    step: int
    checkpointer: Any
    env: Any

    def states(self) -> dict[str, Any]: ...


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, run it again
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# How often the ranks agree on the flag. The all-reduce is a host sync point: on
# gloo it took 1.4-2.8 ms (2 ranks, 2 busy cores), 1.5-3% of a default 1024-sample
# step on this CPU and more of a tiny one; on CUDA it would also wait for each
# step's kernels. Every 10 steps it is noise, and a stop comes at most 9 steps late,
# far inside SLURM's warning.
CHECK_EVERY_STEPS = {"cpu": 10, "cuda": 10}
# A signal whose handler has not run this long after it arrived means the main
# thread is stuck in one native call (a collective with a dead peer): exit at once.
# A healthy rank waits in a collective at most for its peers' skew (a step, a
# checkpoint's write, rank 0's export); over this, a preemption exits without its
# checkpoint and the requeued run resumes from the previous one.
BLOCKED_EXIT_S = 5.0


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; the process exits with 75."""

    def __init__(self, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class Preemption:
    """SIGUSR1/SIGTERM set a flag; :meth:`should_stop` makes every rank agree on it.

    ``check_every_steps`` spaces the agreement out: the all-reduce is a host sync
    point (on CUDA it waits for the step's kernels), so by default the ranks agree
    every 10 steps (:data:`CHECK_EVERY_STEPS`); a signal is then honoured at most
    9 steps late.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        world_size: int,
        check_every_steps: int | None = None,
        signals: tuple[signal.Signals, ...] = SIGNALS,
        blocked_exit_s: float | None = BLOCKED_EXIT_S,
    ) -> None:
        """``blocked_exit_s``: see :data:`BLOCKED_EXIT_S`; None: no watchdog."""
        if check_every_steps is None:
            check_every_steps = CHECK_EVERY_STEPS.get(device.type, 1)
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps must be >= 1, got {check_every_steps}")
        self.device = device
        self.world_size = world_size
        self.check_every_steps = check_every_steps
        self.signals = signals
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self.blocked_exit_s = blocked_exit_s
        self._handled_at = -math.inf  # when the main thread last ran the handler
        self._wakeup: tuple[int, int] | None = None  # (read, write) ends of the pipe
        self._previous_wakeup_fd = -1

    def install(self) -> Preemption:
        """Installs the handlers (main thread only; elsewhere it logs and does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption handlers not installed: not on the main thread")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.blocked_exit_s is not None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
            os.set_blocking(read_fd, False)  # the watchdog drains it, then waits in select
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._wakeup = (read_fd, write_fd)
            threading.Thread(
                target=self._watch, args=(read_fd,), name="preemption-watchdog", daemon=True
            ).start()
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._wakeup[1])  # the watchdog reads EOF and ends
            self._wakeup = None

    def _watch(self, read_fd: int) -> None:
        """The watchdog thread: exits the process when a signal stays unhandled (see above)."""
        # SIGTERM only: it is the signal a SIGKILL follows (torchrun's 30 s grace, SLURM's
        # KillWait). USR1 is SLURM's early warning: a rank waiting on a long save or
        # export then still has time to finish it and write its checkpoint.
        watched = {int(sig) for sig in self.signals if sig == signal.SIGTERM}
        # Python's C-level handler writes a signal's byte before the main thread runs
        # its handler, so a handler run after the moment the pipe was last seen empty
        # answers every byte read since (a run before that moment answers an older
        # byte, which is why "empty" is taken before the read that finds it empty).
        empty_since = time.monotonic()
        try:
            while True:
                select.select([read_fd], [], [])  # blocks without the GIL
                data, closed = b"", False
                while True:  # drain: everything written so far
                    before = time.monotonic()
                    try:
                        chunk = os.read(read_fd, 64)
                    except BlockingIOError:
                        break
                    if not chunk:
                        closed = True
                        break
                    data += chunk
                since, empty_since = empty_since, before
                ours = [signum for signum in data if signum in watched]
                if ours:
                    self._exit_if_unhandled(ours[0], since=since)
                if closed:
                    return
        finally:
            os.close(read_fd)

    def _exit_if_unhandled(self, signum: int, *, since: float) -> None:
        deadline = time.monotonic() + (self.blocked_exit_s or 0.0)
        while time.monotonic() < deadline:
            if self._handled_at >= since or self._wakeup is None:  # handled, or uninstalled
                return
            time.sleep(0.05)
        if self._handled_at >= since or self._wakeup is None:
            return
        name = signal.Signals(signum).name
        # os.write, not logging: the main thread may hold the logging lock.
        os.write(
            2,
            f"shardrec: {name} not handled after {self.blocked_exit_s:g} s: the main thread "
            f"is stuck (a collective with a dead peer?); exiting now with {128 + signum}, "
            f"without a checkpoint (a restart resumes from the last one)\n".encode(),
        )
        os._exit(128 + signum)

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._handled_at = time.monotonic()
        if self.requested is None:
            self.requested = signal.Signals(signum)
            # Logging from a signal handler can deadlock on the handler's lock; keep it
            # to a flag and let should_stop() report it.

    def request(self, sig: signal.Signals = signal.SIGUSR1) -> None:
        """What a signal does, for callers that decide to stop on their own."""
        self._handle(sig, None)

    def should_stop(self, step: int) -> bool:
        """True on every rank once any rank was signalled (a collective every k steps)."""
        if step % self.check_every_steps:
            return False
        flag = torch.tensor([0 if self.requested is None else 1], device=self.device)
        return bool(any_rank(flag).item())

    def checkpoint_and_exit(self, trainer: Stoppable, *, saved: Any = None) -> None:
        """Saves the trainer's state at its current step and raises :class:`Preempted`.

        ``saved``: the checkpoint the trainer has just written at this step, if any
        (it is waited for instead of written twice).
        """
        reason = self.requested.name if self.requested else "another rank's signal"
        if trainer.checkpointer is None:
            log.warning("stopping at step %d (%s) without a checkpoint", trainer.step, reason)
        else:
            path = saved or trainer.checkpointer.save(step=trainer.step, states=trainer.states())
            wait = getattr(trainer.checkpointer, "wait", None)
            if wait is not None:  # an async save must be on disk before the process exits
                wait()
            if trainer.env.is_main:
                log.warning(
                    "stopped at step %d (%s); checkpoint %s; exit %d: requeue with "
                    "trainer.resume=auto",
                    trainer.step,
                    reason,
                    path,
                    PREEMPTED_EXIT_CODE,
                )
        raise Preempted(trainer.step)
