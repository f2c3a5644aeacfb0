"""DLRM's sparse arch over factorized tables (compression/factorized.py).

The collection holds the stored tables (``rows x width``, or a QR table's
``<t>_q`` / ``<t>_r``); :class:`FactorizedSparseArch` derives the lookup's ids
before it and maps its pooled outputs back to one ``dim``-wide vector per model
feature after it, so the interaction and the MLPs see what an unfactorized
model's sparse arch gives them (``[B, F, D]``, features in model order).

:func:`factor_specs` reads the factorization off the run's resolved tables
(``rank``, ``qr_buckets``, ``qr_op``; trainer/config/tables.py); a table without
them has ``width == dim`` and no QR split.

Example::

    specs = factor_specs(tables, dim=16)
    arch = FactorizedSparseArch(specs, data_type=DataType.FP32, device=device)
    embedded = arch(kjt)                                       # B x F x 16
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.factorized import Factorized, FactorSpec, stored_configs
from trainer.models.sparse_arch import SparseArchAfterLookup


def factor_specs(tables: Sequence[Any], *, dim: int | None = None) -> list[FactorSpec]:
    """One :class:`FactorSpec` per table spec (``dim``: the model's width; None: each
    table's ``embedding_dim``)."""
    return [
        FactorSpec(
            name=t.name,
            feature_names=list(t.feature_names),
            rows=t.num_embeddings,
            dim=dim or t.embedding_dim,
            width=getattr(t, "rank", 0) or 0,
            qr_buckets=getattr(t, "qr_buckets", 0) or 0,
            qr_op=str(getattr(t, "qr_op", "") or "mul"),
            pooling=str(t.pooling),
        )
        for t in tables
    ]


class FactorizedSparseArch(SparseArchAfterLookup):
    """torchrec's SparseArch over stored (factorized) tables: ``features -> [B, F, D]``."""

    def __init__(
        self,
        specs: Sequence[FactorSpec],
        *,
        data_type: DataType = DataType.FP32,
        device: torch.device,
        tables_device: torch.device | None = None,
    ) -> None:
        ebc = EmbeddingBagCollection(
            tables=stored_configs(specs, data_type), device=tables_device or device
        )
        super().__init__(ebc)
        self.factorized = Factorized(specs, device=device)
        dims = {s.dim for s in specs}
        if len(dims) != 1:
            raise ValueError(f"a DLRM reads one embedding dim for every table, got {sorted(dims)}")
        self.D = dims.pop()
        self._sparse_feature_names = [f for s in specs for f in s.feature_names]
        self.F = len(self._sparse_feature_names)

    def lookup(self, features: KeyedJaggedTensor) -> Any:
        return self.embedding_bag_collection(self.factorized.split_kjt(features))

    def forward(self, features: KeyedJaggedTensor, pooled: Any = None) -> torch.Tensor:
        if pooled is None:
            pooled = self.lookup(features)
        by_name = self.factorized.combine(pooled.to_dict())  # the first use waits
        values = [by_name[name] for name in self.sparse_feature_names]
        return torch.cat(values, dim=1).reshape(-1, self.F, self.D)
