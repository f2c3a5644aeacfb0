"""Sharding a managed-collision collection on CPU as well as on CUDA.

torchrec's ``ShardedManagedCollisionEmbeddingBagCollection`` re-initialises the
rows it hands to newly admitted ids, and resets their optimizer state, through
FBGEMM's ``reset_weight_momentum``, which has only a CUDA kernel: on CPU the
first admission fails with "Could not run 'fbgemm::reset_weight_momentum' with
arguments from the 'CPU' backend". :class:`ShardedMCEBCAnyDevice` does the same
on CPU with tensor ops: the rows' optimizer state (FBGEMM's per-table views,
``split_optimizer_states``) is zeroed and the rows get the table's ``init_fn``.
The evicted rows torchrec reports are global row ids; a row-wise shard holds
rows ``[offset, offset + rows)``, so they are made local first.

Example::

    sharder = ManagedCollisionSharderAnyDevice(ebc_sharder=EmbeddingBagCollectionSharderAnyDevice())
    DistributedModelParallel(model, sharders=[sharder, ...], plan=plan, ...)
"""

from __future__ import annotations

import torch
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection


class ShardedMCEBCAnyDevice(ShardedManagedCollisionEmbeddingBagCollection):
    """torchrec's sharded MC-EBC, with its eviction reset written for CPU too."""

    def _evict(self, evictions_per_table: dict[str, torch.Tensor | None]) -> None:
        if self._device.type == "cuda":
            super()._evict(evictions_per_table)
            return
        modules = self._managed_collision_collection._managed_collision_modules
        configs = self._embedding_module._table_name_to_config
        for table, rows in evictions_per_table.items():
            if rows is None or rows.numel() == 0:
                continue
            local = rows.long() - modules[table]._output_global_offset
            tbe, logical_ids = self._table_to_tbe_and_index[table]
            with torch.no_grad():
                for state in tbe.split_optimizer_states()[int(logical_ids[0])]:
                    if state.dim() >= 1 and state.shape[0] >= int(local.max()) + 1:
                        state[local] = 0  # momentum (row-wise: one per row), prev_iter
                weight = self._embedding_module.embedding_bags.get_parameter(f"{table}.weight")
                weight.data[local] = configs[table].init_fn(weight.data[local])


class ManagedCollisionSharderAnyDevice(ManagedCollisionEmbeddingBagCollectionSharder):
    """torchrec's MC-EBC sharder, building :class:`ShardedMCEBCAnyDevice`."""

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedMCEBCAnyDevice:
        return ShardedMCEBCAnyDevice(
            module,
            params,
            ebc_sharder=self._e_sharder,  # type: ignore[arg-type]
            mc_sharder=self._mc_sharder,
            env=env,
            device=device or torch.device("cuda"),
        )
