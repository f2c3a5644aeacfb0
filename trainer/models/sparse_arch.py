"""torchrec's ``SparseArch`` that can be handed its collection's pooled output.

DLRM's sparse-first forward (``dlrm.py``) starts the tables' lookup before the
bottom MLP and hands the (possibly in-flight) result to the sparse arch later;
the factorized tables' arch (``factorized.py``) subclasses this one.
"""

from __future__ import annotations

from typing import Any

import torch
from torchrec.models.dlrm import SparseArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class SparseArchAfterLookup(SparseArch):
    """torchrec's SparseArch, which can be handed its collection's (lazy) output."""

    def lookup(self, features: KeyedJaggedTensor) -> Any:
        """The collection's (possibly in-flight) pooled output for ``features``."""
        return self.embedding_bag_collection(features)

    def forward(self, features: KeyedJaggedTensor, pooled: Any = None) -> torch.Tensor:
        if pooled is None:
            return super().forward(features)
        # SparseArch.forward's own steps after its lookup (the first use waits).
        by_name = pooled.to_dict()
        values = [by_name[name] for name in self.sparse_feature_names]
        return torch.cat(values, dim=1).reshape(-1, self.F, self.D)
