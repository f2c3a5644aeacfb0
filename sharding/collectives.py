"""Every collective the trainer calls outside torchrec, in one place.

Each is a no-op (or the local answer) without a process group or with one
rank, so callers need no ``if dist.is_initialized()`` of their own. All are
collectives: every rank must call them, in the same order.

Example::

    bytes_per_rank = all_gather_object(local_table_bytes(model))   # [r0, r1, ...]
    path = broadcast_object(path if is_main() else None)           # rank 0's answer
    loss = global_mean(loss_sum / count)                           # float, same everywhere
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if _distributed():
        dist.barrier()


def all_gather_object(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order."""
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: T, *, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (the others pass anything, e.g. None)."""
    if not _distributed():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_mean(value: torch.Tensor) -> float:
    """The mean over ranks of a scalar tensor, as a float (a host sync)."""
    value = value.detach().clone()
    if _distributed():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)
