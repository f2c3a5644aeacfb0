"""Saving checkpoints: atomic, optionally asynchronous, and safe when a save fails.

The layout and the loading side are in trainer/checkpoint/load.py. A save writes
DCP's files into ``.tmp-step_N``; once every rank's files and DCP's metadata
are written, rank 0 adds ``config.yaml`` and renames the directory to
``step_N`` (the only moment a checkpoint becomes visible), then prunes to the
newest ``keep``.

**Async** (``trainer.async_checkpoint=true``): ``dcp.async_save`` copies the
state to a staging buffer and returns; a background thread writes it (its
collectives on a gloo group of their own, so they never interleave with the
training's). The loop is blocked only for the snapshot and for the previous
save if it has not finished yet (one save in flight at a time). The rename
happens when the save is waited for: at the next save, or at the end of the
run (:meth:`Checkpointer.wait`, before the summary).

**A failed save** (disk full, a lost mount): DCP reports a write error on one
rank to every rank (``CheckpointException``); rank 0's own steps (config,
rename) report through a broadcast. Every rank thus takes the same branch: the
temp directory is removed, the previous checkpoint is untouched (nothing is
pruned before the new one is complete), and ``trainer.on_checkpoint_error``
decides: ``stop`` raises :class:`CheckpointSaveError`; ``warn`` logs and trains on.

Example::

    ckpt = Checkpointer(run_dir / "checkpoints", every_steps=500, keep=2,
                        config_yaml=config_to_yaml(cfg),
                        async_save=True, on_error="warn")
    ckpt.save(step=500, states=trainer.states())   # returns after the snapshot
    ckpt.wait()                                    # the save is complete and renamed
    ckpt.blocked_s                                 # seconds the loop waited, per save
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.stateful import Stateful

from sharding.collectives import barrier, broadcast_object, is_main
from trainer.checkpoint.load import _TMP_PREFIX, CONFIG_FILE, complete_checkpoints

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the previous checkpoint is whole."""


@dataclass
class _Pending:
    future: Future
    step: int
    tmp: Path
    final: Path
    published: threading.Event = field(default_factory=threading.Event)
    publish_error: str | None = None  # rank 0's own steps (config, rename)
    start_s: float = field(default_factory=time.perf_counter)


def _snapshot(value: Any) -> Any:
    """A copy of a state dict that training can no longer change (same device).

    DCP's default stager cannot copy torchrec's ``ShardedTensor`` tables, so the
    copy is made here: each local shard cloned, its global metadata kept.
    """
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_snapshot(item) for item in value]
    if isinstance(value, ShardedTensor):
        shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    if isinstance(value, torch.Tensor):
        return value.detach().clone()  # a DTensor clones its local part
    return value


class _AlreadyStaged(AsyncStager):
    """The state dict handed over is already a private copy (see :func:`_snapshot`)."""

    _synchronize_after_execute = False

    def stage(self, state_dict: Any) -> Any:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _describe(err: BaseException) -> str:
    """One line: DCP's CheckpointException lists each failed rank's own exception."""
    if isinstance(err, CheckpointException):
        return "; ".join(
            f"rank {rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            for rank, (exc, _trace) in sorted(err.failures.items())
        )
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}"


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB free"
    except OSError:
        return "free space unknown"


def _prune(directory: Path, *, keep: int) -> None:
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class Checkpointer:
    """When and where the loop saves: every ``every_steps`` (0: never) and at the end."""

    directory: Path
    every_steps: int
    keep: int
    # The run's resolved config, written beside the state as config.yaml.
    config_yaml: str
    async_save: bool = False
    on_error: str = "stop"  # stop | warn
    # Collective, run first in every save: e.g. the replica sync's flush(), so replicas
    # saved between syncs agree (sharding/replicas.py).
    before_save: Callable[[], None] | None = None
    blocked_s: list[float] = field(default_factory=list)  # per save: the loop's wait
    write_s: list[float] = field(default_factory=list)  # rank 0: save start to complete
    failed_saves: int = 0
    _pending: _Pending | None = None
    _group: Any = None  # the gloo group async saves talk on

    def due(self, step: int, *, num_steps: int) -> bool:
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == num_steps)

    def save(self, *, step: int, states: dict[str, Stateful]) -> Path | None:
        """Collective: saves ``step`` (async: starts it). None if it failed under ``warn``."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        if self.before_save is not None:
            self.before_save()
        final = self.directory / f"step_{step}"
        tmp = self.directory / f"{_TMP_PREFIX}step_{step}"
        error = None
        if is_main():
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a job killed while saving
                tmp.mkdir(parents=True)
            except OSError as err:
                error = _describe(err)
        error = broadcast_object(error)
        if error is None:
            try:
                if self.async_save:
                    snapshot = {key: _snapshot(value.state_dict()) for key, value in states.items()}
                    future = dcp.async_save(
                        snapshot,
                        checkpoint_id=tmp,
                        process_group=self._pg(),
                        async_stager=_AlreadyStaged(),
                    )
                    self._pending = pending = _Pending(future, step, tmp, final)
                    if is_main():  # visible as soon as it is complete, not at the next save
                        future.add_done_callback(lambda _: self._publish(pending))
                else:
                    dcp.save(dict(states), checkpoint_id=tmp)
            except (Exception, CheckpointException) as err:  # the same on every rank
                error = _describe(err)
        if error is not None:
            self._failed(step, tmp, error)
            self.blocked_s.append(time.perf_counter() - start)
            return None
        if not self.async_save:
            done = _Pending(Future(), step, tmp, final)
            done.future.set_result(None)
            if is_main():
                self._publish(done)
            self._finish(done, error=None)
        self.blocked_s.append(time.perf_counter() - start)
        return final

    def wait(self) -> None:
        """Collective: waits for the save in flight, then makes it visible (or reports it)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
            error = None
        except (Exception, CheckpointException) as err:  # a BaseException
            error = _describe(err)
        self._finish(pending, error=error)

    def _publish(self, pending: _Pending) -> None:
        """Rank 0, once DCP's metadata is written (every rank's files are): config, rename."""
        log.debug("step_%d written in %.3f s", pending.step, time.perf_counter() - pending.start_s)
        self.write_s.append(time.perf_counter() - pending.start_s)
        try:
            if pending.future.exception() is None:
                (pending.tmp / CONFIG_FILE).write_text(self.config_yaml)
                shutil.rmtree(pending.final, ignore_errors=True)
                pending.tmp.rename(pending.final)
                _prune(self.directory, keep=self.keep)
        except OSError as err:
            pending.publish_error = _describe(err)
        finally:
            pending.published.set()

    def _finish(self, pending: _Pending, *, error: str | None) -> None:
        if is_main():
            pending.published.wait()
        error = broadcast_object(pending.publish_error if is_main() else None) or error
        barrier()  # nobody reads or re-saves before the rename
        if error is not None:
            self._failed(pending.step, pending.tmp, error)
        elif is_main():
            log.info("checkpoint %s", pending.final)

    def _failed(self, step: int, tmp: Path, error: str) -> None:
        self.failed_saves += 1
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        found = complete_checkpoints(self.directory)
        previous = f"the previous checkpoint {found[-1]} is whole" if found else "none was written"
        message = (
            f"checkpoint at step {step} failed ({error}); {previous}; "
            f"{_free_space(self.directory)} under {self.directory}: free space there or "
            f"move the run (hydra.run.dir=...)"
        )
        if self.on_error == "warn":
            if is_main():
                log.warning("%s; training on (trainer.on_checkpoint_error=warn)", message)
            return
        raise CheckpointSaveError(
            f"{message}; the run stops (trainer.on_checkpoint_error=warn would train on)"
        )

    def _pg(self) -> Any:
        if self._group is None and dist.is_initialized():
            # Created on first use, by every rank at the same save (a collective).
            self._group = dist.new_group(backend="gloo")
        return self._group

    def stats(self) -> dict[str, Any]:
        """For the summary: seconds the loop waited per save, and failed saves."""
        blocked = self.blocked_s
        return {
            "checkpoint_saves": len(blocked),
            "checkpoint_blocked_s_mean": sum(blocked) / len(blocked) if blocked else 0.0,
            "checkpoint_write_s_mean": sum(self.write_s) / max(len(self.write_s), 1),
            "checkpoint_failed_saves": self.failed_saves,
        }
