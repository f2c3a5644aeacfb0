"""The data seam: what the trainer needs from any source of click samples.

A :class:`DataSource` says which features exist (:class:`FeatureSpec`: name,
rows, ids per sample) -- tables and the planner's pooling factors are derived
from it once -- and yields torchrec ``Batch``es for one rank. The loop, export
and config never name a concrete source; ``data=`` picks one
(``synthetic``, ``criteo``, ``table``) and :func:`trainer.data.make_source`
builds it.

Positions are global steps. Training step ``s`` covers the global samples of
step ``s`` and rank ``r`` reads the ``r``-th contiguous block of ``batch_size``
of them (see ``trainer.data.loader``); so the trainer's step alone says where
the stream is, whatever the world size. A source with more to remember (a
streaming source's read offset) keeps it in :meth:`state_dict`, which the
checkpoint stores beside the model (DCP ``Stateful``); every source puts a
fingerprint there so that a resume onto different data is refused.

Implementations:

- ``SyntheticSource`` (``data=synthetic``): samples computed from (seed, split,
  index); ``reference_metrics()`` has the planted model's ``oracle_auc``.
- a memory-mapped shard source (``data=criteo`` / ``data=table``): binary
  shards written once by ``python -m trainer.prepare``; a per-epoch shuffle
  from the seed is a pure function of the step too.
- a streaming source would keep its read position in ``state_dict()``.

Example::

    source = make_source(cfg.data, seed=cfg.trainer.seed)
    [f.name for f in source.features]       # ["cat_0", ...]
    for batch in source.train_batches(batch_size=1024, rank=0, world_size=2,
                                      first_step=0, num_steps=10):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical feature: its table's rows and how many ids a sample has."""

    name: str
    # Ids are in [0, num_embeddings): the table the feature feeds needs this many rows.
    num_embeddings: int
    # Mean ids per sample (the planner's pooling factor); 1.0 for single-hot.
    ids_per_sample: float = 1.0
    # The most ids one sample can have in this feature.
    max_ids_per_sample: int = 1


@runtime_checkable
class DataSource(Protocol):
    """What the trainer sees of a data set (see the module docstring)."""

    features: list[FeatureSpec]
    num_dense: int
    # Every rank evaluates the same number of batches (collectives need it).
    num_eval_samples: int

    def train_batches(
        self, *, batch_size: int, rank: int, world_size: int, first_step: int, num_steps: int
    ) -> Iterator[Batch]:
        """This rank's batches for global steps ``first_step .. first_step + num_steps - 1``."""
        ...

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's share of the eval set; the same number of batches on every rank."""
        ...

    def reference_metrics(self) -> dict[str, float]:
        """Known bounds to compare with (``oracle_auc`` for planted data); {} for real data."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this stream (at least a fingerprint)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ``ValueError`` naming the mismatch."""
        ...
