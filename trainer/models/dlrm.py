"""DLRM and DLRM-DCNv2, built from table specs on any device (``meta`` for sharding).

Both are torchrec's own modules (``torchrec.models.dlrm``): a bottom MLP over the
dense features, an EmbeddingBagCollection pooling each sparse feature's bag of
ids, an interaction (pairwise dots for DLRM, torchrec's computed with a cheaper
gather, see ``interaction.py``; low-rank cross layers, as in the MLPerf
DLRM-DCNv2 reference, for DCNv2), and a top MLP to one logit.
A source without dense features (``num_dense=0``, e.g. an all-categorical
table) hands the model a ``[B, 0]`` dense tensor: the bottom MLP then takes a
constant input of width 1, i.e. it learns one dense vector that every sample's
embeddings interact with (see :class:`ConstantWhenEmptyDenseArch`).
``DLRMTrain`` wraps it with the BCE loss and returns ``(loss, (loss, logits,
labels))``, the shape torchrec's train pipelines expect.

The sparse input is a KeyedJaggedTensor; for two features and a batch of two::

    cat_0: [[3], [7]]        values = [3, 7, 1, 4, 5]
    cat_1: [[1, 4], [5]]     lengths = [1, 1, 2, 1]   (feature-major)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DenseArch, DLRMTrain
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.models.collision import IdManagement, id_managed_collection
from trainer.models.ctr import build_ctr
from trainer.models.factorized import FactorizedSparseArch, factor_specs
from trainer.models.interaction import FlatInteractionArch
from trainer.models.sparse_arch import SparseArchAfterLookup

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class ConstantWhenEmptyDenseArch(DenseArch):
    """torchrec's DenseArch for a ``[B, 0]`` input (no dense features): its first
    layer has one input, the constant 1, so the output is a learned vector, the same
    for every sample. Same parameters and state dict as DenseArch; used only when the
    model is built with ``num_dense=0``."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # No branch on the input's shape: torchrec's train pipeline traces through here.
        return self.model(features.new_ones(features.shape[0], 1))


class _SparseFirst:
    """DLRM's forward with the tables' lookup started before the bottom MLP.

    torchrec's ``DLRM.forward`` runs the bottom MLP, then the sparse arch, whose
    sharded collection returns a ``LazyAwaitable``: the pooled all-to-all is in
    flight from the lookup until the first use of its result. torchrec uses it
    at once (``SparseArch`` splits it), so nothing overlaps the exchange. Here
    the lookup comes first and the bottom MLP runs while its all-to-all is in
    flight; in backward (autograd runs the most recently created ready node
    first) the bottom MLP's backward then runs between sending the pooled
    gradients and waiting for them. Same modules (the sparse arch is still
    called, hooks on it still fire), same ops on the same inputs, so the same
    numbers bit for bit; only independent work is reordered.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sparse_arch = SparseArchAfterLookup(self.sparse_arch.embedding_bag_collection)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        pooled = self.sparse_arch.lookup(sparse_features)  # may be in flight
        embedded_dense = self.dense_arch(dense_features)
        embedded_sparse = self.sparse_arch(sparse_features, pooled=pooled)
        concatenated = self.inter_arch(
            dense_features=embedded_dense, sparse_features=embedded_sparse
        )
        return self.over_arch(concatenated)


class SparseFirstDLRM(_SparseFirst, DLRM):
    """torchrec's DLRM; the lookup's all-to-all overlaps the bottom MLP (see _SparseFirst)."""


class SparseFirstDLRM_DCN(_SparseFirst, DLRM_DCN):  # noqa: N801 (torchrec's name)
    """torchrec's DLRM_DCN; the lookup's all-to-all overlaps the bottom MLP."""


class TableSpec(Protocol):
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str]
    pooling: str


def embedding_bag_configs(
    tables: Sequence[TableSpec], data_type: DataType = DataType.FP32
) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            data_type=data_type,
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=_POOLING[t.pooling],
        )
        for t in tables
    ]


def build_model(
    *,
    arch: str,
    tables: Sequence[TableSpec],
    num_dense: int,
    dense_arch_layer_sizes: list[int],
    over_arch_layer_sizes: list[int],
    device: torch.device,
    dcn_num_layers: int = 3,
    dcn_low_rank_dim: int = 64,
    table_data_type: DataType = DataType.FP32,
    tables_device: torch.device | None = None,
    id_management: IdManagement | None = None,
) -> DLRMTrain:
    """A DLRM (``arch="dlrm"``), DLRM-DCNv2 (``"dlrm_dcnv2"``), DeepFM (``"deepfm"``)
    or Wide&Deep (``"wide_deep"``, see ctr.py) wrapped with its loss.

    DeepFM and Wide&Deep have no bottom MLP (``dense_arch_layer_sizes`` and the
    ``dcn_*`` settings are unused); ``over_arch_layer_sizes`` is their deep MLP.

    ``num_dense=0``: the bottom MLP takes one constant input (the batches' dense
    tensor is ``[B, 0]``), see :class:`ConstantWhenEmptyDenseArch`.
    ``tables_device``: where the embedding tables live, if not on ``device``.
    ``id_management``: hashing or managed collision in front of the tables (collision.py).
    """
    if num_dense < 0:
        raise ValueError(f"num_dense={num_dense} must be >= 0")
    specs = factor_specs(tables)
    factorized = any(s.factorized for s in specs)
    if arch in ("deepfm", "wide_deep"):
        ctr = build_ctr(
            arch=arch,
            fields=embedding_bag_configs(tables, table_data_type),
            num_dense=num_dense,
            over_arch_layer_sizes=over_arch_layer_sizes,
            device=device,
            tables_device=tables_device,
            data_type=table_data_type,
            factors=specs if factorized else None,
        )
        return DLRMTrain(ctr)  # torchrec's wrapper only calls model(dense, sparse)
    stored_device = tables_device
    if factorized:  # the collection built below only sizes the arch; the stored one replaces it
        tables_device = torch.device("meta")
    ebc = id_managed_collection(
        embedding_bag_configs(tables, table_data_type),
        id_management,
        device=tables_device or device,
    )
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=max(num_dense, 1),
        dense_arch_layer_sizes=list(dense_arch_layer_sizes),
        over_arch_layer_sizes=list(over_arch_layer_sizes),
        dense_device=device,
    )
    if arch == "dlrm":
        dlrm = SparseFirstDLRM(**common)
        # Same computation, bit for bit; the triangle gathered without 2-D indexing.
        dlrm.inter_arch = FlatInteractionArch(num_sparse_features=dlrm.inter_arch.F)
    elif arch == "dlrm_dcnv2":
        dlrm = SparseFirstDLRM_DCN(
            **common, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim
        )
    else:
        raise ValueError(
            f"model.arch={arch!r} is not known; use dlrm, dlrm_dcnv2, deepfm or wide_deep"
        )
    if factorized:
        # Low-rank / QR / mixed-width tables: the stored collection and the steps
        # around it replace the sparse arch (trainer/models/factorized.py).
        dlrm.sparse_arch = FactorizedSparseArch(
            specs,
            data_type=table_data_type,
            device=device,
            tables_device=stored_device,
        )
    dlrm.num_dense = num_dense  # the batches' dense width (the bottom MLP's is >= 1)
    if num_dense == 0:  # the same module (no second init, same state dict), fed a constant
        dlrm.dense_arch.__class__ = ConstantWhenEmptyDenseArch
    return DLRMTrain(dlrm)
