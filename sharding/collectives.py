"""Every collective the trainer calls outside torchrec, in one place.

Each is a no-op (or the local answer) without a process group or with one
rank, so callers need no ``if dist.is_initialized()`` of their own. All are
collectives: every rank must call them, in the same order.

Example::

    bytes_per_rank = all_gather_object(local_table_bytes(model))   # [r0, r1, ...]
    path = broadcast_object(path if is_main() else None)           # rank 0's answer
    loss = global_mean(loss_sum / count)                           # float, same everywhere
    stop = any_rank(torch.tensor([1 if signalled else 0]))          # 1 on every rank if any

The tensor collectives (``any_rank``, ``all_sum``, ``all_min``) reduce in place
and stay on the tensor's device: no host sync unless the caller reads the value.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


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


def any_rank(flag: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In place: ``flag`` (0 = no, > 0 = yes; or a step, -1 for none) maxed over ranks,
    so every rank agrees that some rank flagged (a NaN, a signal, an overflow)."""
    if _distributed(group):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def all_sum(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In place: ``tensor`` summed over the ranks of ``group``."""
    if _distributed(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def all_min(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In place: the elementwise minimum of ``tensor`` over the ranks of ``group``."""
    if _distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return tensor


def broadcast_tensor(
    tensor: torch.Tensor, *, src: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """In place: global rank ``src``'s ``tensor`` on every rank of ``group``."""
    if _distributed(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor
