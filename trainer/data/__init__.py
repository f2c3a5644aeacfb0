"""Input data: synthetic Criteo-shaped clicks with a planted model, sliced per rank.

Example::

    from trainer.data import SyntheticCriteo, SyntheticDataConfig, rank_batches

    data = SyntheticCriteo(SyntheticDataConfig())
    for batch in rank_batches(data, "train", batch_size=1024, rank=0, world_size=2, num_batches=10):
        ...  # torchrec Batch: dense_features, sparse_features (KJT), labels
"""

from trainer.data.loader import eval_batches, eval_slices, rank_batches
from trainer.data.synthetic import SyntheticCriteo, SyntheticDataConfig

__all__ = ["SyntheticCriteo", "SyntheticDataConfig", "eval_batches", "eval_slices", "rank_batches"]
