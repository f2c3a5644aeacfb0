"""Input data behind one seam, :class:`DataSource` (``trainer.data.source``).

``data=`` picks the source: ``synthetic`` (planted clicks with a known oracle
AUC), ``criteo`` / ``table`` (shards written once by ``python -m
trainer.prepare``). :func:`make_source` builds it from its config; the trainer
sees only the protocol.

Example::

    from trainer.data import make_source
    from trainer.data.synthetic_config import SyntheticDataConfig

    source = make_source(SyntheticDataConfig())
    for batch in source.train_batches(batch_size=1024, rank=0, world_size=2,
                                      first_step=0, num_steps=10):
        ...  # torchrec Batch: dense_features, sparse_features (KJT), labels
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.data.loader import eval_batches, eval_slices, rank_batches
    from trainer.data.source import DataSource, FeatureSpec
    from trainer.data.synthetic import SyntheticCriteo, SyntheticSource
    from trainer.data.synthetic_config import SyntheticDataConfig

# Imported on first use (PEP 562): the config schema imports
# ``trainer.data.synthetic_config`` without pulling in torchrec through the sources.
_EXPORTS = {
    "eval_batches": "trainer.data.loader",
    "eval_slices": "trainer.data.loader",
    "rank_batches": "trainer.data.loader",
    "DataSource": "trainer.data.source",
    "FeatureSpec": "trainer.data.source",
    "SyntheticCriteo": "trainer.data.synthetic",
    "SyntheticSource": "trainer.data.synthetic",
    "SyntheticDataConfig": "trainer.data.synthetic_config",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def make_source(cfg: Any, *, seed: int | None = None) -> DataSource:
    """The source ``cfg`` (one of the ``data=`` schemas) describes.

    ``seed``: the run's (``trainer.seed``), for sources whose order it sets when
    their own ``data.seed`` is unset (the prepared shards' per-epoch shuffle).
    """
    from trainer.data.synthetic import SyntheticSource
    from trainer.data.synthetic_config import SyntheticDataConfig

    if isinstance(cfg, SyntheticDataConfig):
        return SyntheticSource(cfg)
    if getattr(cfg, "name", None) in ("criteo", "table"):
        from trainer.data.shards import ShardSource  # reads prepared shards

        return ShardSource.from_config(cfg, seed=seed)
    raise ValueError(f"data={getattr(cfg, 'name', cfg)!r} has no source")


__all__ = [
    "DataSource",
    "FeatureSpec",
    "SyntheticCriteo",
    "SyntheticDataConfig",
    "SyntheticSource",
    "eval_batches",
    "eval_slices",
    "make_source",
    "rank_batches",
]
