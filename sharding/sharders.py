"""Embedding sharders, with every strategy available on CPU too.

torchrec's EmbeddingBagCollectionSharder offers row_wise, table_row_wise and
grid_shard only when the compute device is CUDA, so on CPU the planner never
proposes them and a constraint asking for them fails with "No available sharding
type and compute kernel combination". The CPU kernels (FBGEMM's CPU TBE) run
them fine over gloo; whether they are *right* is decided by the equivalence
tests in tests/, which compare each against an unsharded model.

They are offered on request only: ``sharding=auto`` on CPU chooses among the
types torchrec itself offers there (:func:`auto_sharding_types`), because the
planner's cost model prefers row-wise on CPU although it is slower there than
table-wise (one all-to-all of ids and one reduce-scatter of pooled rows per
table instead of one all-to-all of pooled rows).

Example::

    auto_sharding_types("cpu")   # ['data_parallel', 'table_wise', 'column_wise', ...]
    sharders = embedding_sharders(fused_params={"learning_rate": 0.05})
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

from sharding.collision import ManagedCollisionSharderAnyDevice

_CPU_EXTRA = (
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.GRID_SHARD.value,
)


class EmbeddingBagCollectionSharderAnyDevice(EmbeddingBagCollectionSharder):
    """torchrec's sharder, with row-wise, table-row-wise and grid on CPU as well."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [t for t in _CPU_EXTRA if t not in types]
        return types


def auto_sharding_types(compute_device_type: str) -> list[str]:
    """``sharding=auto``'s choices: the types torchrec itself offers on the device, less
    data_parallel, which would silently move a table from the fused row-wise Adagrad
    to the dense optimizer (and to 16-bit dense updates under bf16/fp16); a table
    becomes data_parallel only when asked for."""
    offered = EmbeddingBagCollectionSharder().sharding_types(compute_device_type)
    return [t for t in offered if t != ShardingType.DATA_PARALLEL.value]


def embedding_sharders(
    *, fused_params: dict[str, Any] | None = None, qcomm_codecs_registry: Any = None
) -> list[ModuleSharder[nn.Module]]:
    """The sharders DistributedModelParallel and the planner use (the second shards a
    managed-collision collection, row-wise only, with the first for its tables)."""
    ebc = EmbeddingBagCollectionSharderAnyDevice(
        fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
    )
    managed = ManagedCollisionSharderAnyDevice(
        ebc_sharder=EmbeddingBagCollectionSharderAnyDevice(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
        ),
        qcomm_codecs_registry=qcomm_codecs_registry,
    )
    return [ebc, managed]
