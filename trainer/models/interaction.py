"""DLRM's pairwise interaction, torchrec's computation with a cheaper gather.

torchrec's ``InteractionArch`` takes the upper triangle of the (B, F+1, F+1)
matrix of dot products with two index tensors, ``z[:, rows, cols]``. On CPU that
advanced indexing and its backward (``index_put_`` with ``accumulate=True``,
which sorts the indices) cost about as much as the batched matmul itself: on the
bench's small shape (B 2048, 26 tables, dim 16, one thread) they were ~18 of a
~100 ms step. Here the same elements are picked from the flattened matrix with
one ``index_select`` (backward: ``index_add_`` of unique indices). The forward
and both gradients are bit for bit torchrec's (``tests/test_interaction.py``);
the module is a drop-in subclass, so state dicts and the DLRM around it are
unchanged.

For F = 2 sparse features and the dense vector d, the rows of ``z`` are
(d, e0, e1) and the output is ``[d, d.e0, d.e1, e0.e1]``::

    z = [[d.d,  d.e0,  d.e1 ],        flat index of (0, 1), (0, 2), (1, 2)
         [e0.d, e0.e0, e0.e1],        with 3 columns: 1, 2, 5
         [e1.d, e1.e0, e1.e1]]

Example::

    inter = FlatInteractionArch(num_sparse_features=26)
    out = inter(dense_features, sparse_features)   # B x (D + 26 + 26 * 25 / 2)
"""

from __future__ import annotations

import torch
from torchrec.models.dlrm import InteractionArch


class FlatInteractionArch(InteractionArch):
    """torchrec's ``InteractionArch`` with the triangle gathered by ``index_select``."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__(num_sparse_features=num_sparse_features)
        rows, cols = self.triu_indices
        # Not persistent, like triu_indices: state dicts stay torchrec's.
        self.register_buffer("triu_flat", rows * (self.F + 1) + cols, persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        interactions = torch.bmm(combined, combined.transpose(1, 2))
        pairs = interactions.flatten(1).index_select(1, self.triu_flat)
        return torch.cat((dense_features, pairs), dim=1)
