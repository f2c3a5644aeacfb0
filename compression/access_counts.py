"""How often each embedding row was looked up in training, counted without a host sync.

:class:`AccessCounter` keeps one flat ``int64`` counter on the training device
holding every feature's rows (feature ``f`` at ``[base_f, base_f + rows_f)``).
Each training step adds the ids of this rank's own batch, read from the
``KeyedJaggedTensor`` the pipeline hands the forward -- before the input
all-to-all, in global row ids. That is why it counts there rather than on the
ids each sharded kernel sees after the input dist: the batch's ids mean the
same thing under every plan (table-, row-, column-wise, grid, data parallel),
while a row-wise shard sees local offsets and column-wise shards of one table
would each count the same lookup again. The price: the counter is replicated
(8 bytes per row per rank, not sharded with its table).

Worked example, keys ``["cat_0", "cat_1"]``, stride (batch) 2::

    lengths  [1, 2,   0, 1]          cat_0: sample 0 one id, sample 1 two ids; cat_1: ...
    values   [4, 7, 4,   2]
    key of each value  [0, 0, 0, 1]  (arange(keys).repeat_interleave(stride), then by lengths)
    flat index         [b0+4, b0+7, b0+4, b1+2]  -> counts.index_add_(0, index, ones)

Every size there is known on the host (``values.numel()``, the stride), so the
step never waits for the device. Ranks count their own batches; the totals
meet in :meth:`AccessCounter.synced` (one all-reduce, at checkpoint and export
time): afterwards rank 0 holds the totals and the others zero, so the sum over
ranks stays the global count and a checkpoint stores one replicated tensor.

Example::

    counter = AccessCounter({"cat_0": 40, "cat_1": 100})
    counter.add(batch.sparse_features)          # each training step
    totals = counter.synced(process_group)      # collective: {"cat_0": tensor[40], ...}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharding.collectives import all_sum


class AccessCounter:
    """Per-feature row access counts (module docstring).

    ``feature_rows``: the rows of each feature's table.
    """

    def __init__(self, feature_rows: dict[str, int]) -> None:
        self.feature_rows = dict(feature_rows)
        self.bases: dict[str, int] = {}
        total = 0
        for feature, rows in self.feature_rows.items():
            self.bases[feature] = total
            total += rows
        self.counts = torch.zeros(total, dtype=torch.int64)
        self._base_cache: dict[tuple[tuple[str, ...], torch.device], Tensor] = {}

    def to(self, device: torch.device) -> None:
        self.counts = self.counts.to(device)
        self._base_cache.clear()

    def _key_bases(self, keys: list[str], device: torch.device) -> Tensor:
        cache_key = (tuple(keys), device)
        if cache_key not in self._base_cache:
            unknown = [k for k in keys if k not in self.bases]
            if unknown:
                raise ValueError(f"access counts: features {unknown} have no table")
            bases = [self.bases[k] for k in keys]
            self._base_cache[cache_key] = torch.tensor(bases, dtype=torch.int64, device=device)
        return self._base_cache[cache_key]

    @torch.no_grad()
    def add(self, features: KeyedJaggedTensor) -> None:
        """Counts every id of ``features`` (no host sync: all sizes are known on the host)."""
        values = features.values()
        if values.numel() == 0:
            return
        keys = features.keys()
        stride = features.stride()
        slot_key = torch.arange(len(keys), device=values.device).repeat_interleave(stride)
        value_key = slot_key.repeat_interleave(features.lengths(), output_size=values.numel())
        index = self._key_bases(keys, values.device)[value_key] + values.long()
        self.counts.index_add_(0, index, torch.ones_like(index))

    @torch.no_grad()
    def synced(self, process_group: Any = None) -> dict[str, Tensor]:
        """Collective (when a process group is up): every rank's counts summed, per feature.

        After it rank 0 holds the totals and the other ranks zero, so later steps
        keep adding to a sum over ranks that is the global count.
        """
        totals = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            all_sum(totals, group=process_group)
            if dist.get_rank(process_group) == 0:
                self.counts.copy_(totals)
            else:
                self.counts.zero_()
        return self._per_feature(totals)

    def local(self) -> dict[str, Tensor]:
        """This process's counts, no collective: the totals on rank 0 right after
        :meth:`synced` (or in one process)."""
        return self._per_feature(self.counts.clone())

    def _per_feature(self, counts: Tensor) -> dict[str, Tensor]:
        return {
            feature: counts[base : base + self.feature_rows[feature]]
            for feature, base in self.bases.items()
        }

    @torch.no_grad()
    def load(self, per_feature: dict[str, Tensor], process_group: Any = None) -> None:
        """The totals of a checkpoint: on rank 0 (zeros elsewhere, see :meth:`synced`)."""
        self.counts.zero_()
        rank0 = (
            not (dist.is_available() and dist.is_initialized()) or dist.get_rank(process_group) == 0
        )
        if not rank0:
            return
        for feature, counts in per_feature.items():
            base = self.bases[feature]
            self.counts[base : base + self.feature_rows[feature]].copy_(counts)
