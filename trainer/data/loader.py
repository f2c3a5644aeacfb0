"""Which samples each rank reads.

Training step ``s`` covers the global samples ``[s * B * W, (s + 1) * B * W)``
(``B`` the per-rank batch size, ``W`` the world size) and rank ``r`` reads the
``r``-th block of ``B`` of them. Concatenating the ranks' batches of a step
therefore gives the same samples whatever the world size, which is what lets a
sharded run be checked against a single-process one.

Evaluation splits the eval set the same way, step by step. When
``num_eval_samples`` is not a multiple of ``B * W``, one last, smaller step gives
every rank ``(remainder // W)`` samples and the final ``remainder % W`` (fewer
than ``W``) samples are skipped, so every rank yields the same number of batches
and every step has the same batch size on all ranks (collectives need both).

Example::

    for batch in rank_batches(data, "train", batch_size=1024, rank=rank,
                              world_size=world_size, num_batches=100):
        loss = model(batch)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torchrec.datasets.utils import Batch


class BatchSource(Protocol):
    num_eval_samples: int

    def batch(self, split: str, start: int, size: int) -> Batch: ...


def rank_batches(
    source: BatchSource,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_batches: int,
    first_batch: int = 0,
) -> Iterator[Batch]:
    """This rank's batches for global steps ``first_batch .. first_batch + num_batches - 1``."""
    check_rank(rank, world_size, batch_size)
    for step in range(first_batch, first_batch + num_batches):
        yield source.batch(split, (step * world_size + rank) * batch_size, batch_size)


def eval_slices(
    num_samples: int, *, batch_size: int, rank: int, world_size: int
) -> list[tuple[int, int]]:
    """``(start, size)`` of this rank's eval batches (see the module docstring)."""
    check_rank(rank, world_size, batch_size)
    step_size = batch_size * world_size
    num_full_steps = num_samples // step_size
    slices = [((s * world_size + rank) * batch_size, batch_size) for s in range(num_full_steps)]
    last_size = (num_samples - num_full_steps * step_size) // world_size
    if last_size > 0:
        slices.append((num_full_steps * step_size + rank * last_size, last_size))
    return slices


def eval_batches(
    source: BatchSource, *, batch_size: int, rank: int, world_size: int
) -> Iterator[Batch]:
    """This rank's share of the eval set; every rank yields the same number of batches."""
    for start, size in eval_slices(
        source.num_eval_samples, batch_size=batch_size, rank=rank, world_size=world_size
    ):
        yield source.batch("eval", start, size)


def check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


# The name other sources imported before it was public.
_check_rank = check_rank
