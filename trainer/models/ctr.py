"""DeepFM and Wide&Deep over the same sharded tables as DLRM, plus one wide table per field.

Both add a **first-order** part (a logistic regression on the ids and the
dense features) to a deep MLP; DeepFM also adds the factorization machine's
second-order term. For F sparse fields with pooled embeddings ``e_f`` (B x D
each), dense features ``x`` (B x num_dense) and one wide weight ``w_f`` per
pooled id (the ``w_<table>`` tables, trainer/config/tables.py)::

    first  = sum_f w_f + Linear(x)                          # B x 1 (Linear's bias: the intercept)
    fm     = 0.5 * sum_d ((sum_f e_f)^2 - sum_f e_f^2)      # B x 1, all pairwise <e_f, e_g>
    deep   = MLP(concat(e_1, ..., e_F, x))                  # B x 1 (model.over_arch_layer_sizes)
    deepfm    = first + fm + deep
    wide_deep = first + deep

The field tables and the wide tables are two torchrec ``EmbeddingBagCollection``s
under ``sparse_arch`` (both read the whole KeyedJaggedTensor), so the planner
shards both, QAT hooks them by table name and the export quantizes both. A wide
table is ``WIDE_DIM`` (4) wide because FBGEMM's training kernels need dims that
are multiples of 4: column 0 is the weight, the others start at zero and, never
read, get a zero gradient and stay zero (so a wide row quantizes as [w, 0, 0, 0]
and w is served exactly up to its fp16 scale). Wide tables start at zero, as a
linear model's weights usually do. Everything after the lookup is one module
(``head``) without tables: torchrec's train pipeline traces through
``sparse_arch`` to pipeline the lookups and treats ``head`` as a leaf.

Factorized field tables (low rank, quotient-remainder, mixed dims;
compression/factorized.py): the field collection holds the *stored* tables and
``sparse_arch.factorized`` derives the lookup's ids before it (QR) and brings
each pooled field back to its ``dim`` after it (:meth:`CTRSparseArch.embedded`),
so the head reads what an unfactorized model's fields give it. The wide tables
stay plain, one ``w_<table>`` per model table over the input features.

The predictor is called like DLRM's, ``(dense [B, num_dense], sparse KJT) ->
logits [B, 1]``, so the loop, eval, export and distillation are unchanged.
``num_dense=0``: the batches' dense tensor is ``[B, 0]``; the first-order
Linear then has no inputs, only its bias, and the MLP reads the embeddings alone.

Example::

    model = CTRModel(fields=ebc, wide=wide_ebc, num_dense=13,
                     layer_sizes=[64, 32, 1], fm=True)          # DeepFM
    logits = model(dense, kjt)                                  # B x 1
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.models.dlrm import OverArch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.factorized import Factorized, FactorSpec, stored_configs
from trainer.config.tables import WIDE_DIM, WIDE_PREFIX


class CTRSparseArch(nn.Module):
    """Both lookups: the field tables (``embedding_bag_collection``, the name DLRM's
    SparseArch uses) and the wide tables (``wide_collection``).

    Returns their outputs as they come (KeyedTensors, or LazyAwaitables of them
    when sharded: the all-to-alls stay in flight until the head reads them).
    ``factorized``: the steps around the field lookup when its tables are
    factorized (the collection then holds the stored tables), else None.
    """

    def __init__(
        self,
        fields: EmbeddingBagCollection,
        wide: EmbeddingBagCollection,
        factorized: Factorized | None = None,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = fields
        self.wide_collection = wide
        self.factorized = factorized

    def forward(self, features: KeyedJaggedTensor) -> tuple[Any, Any]:
        lookup = features if self.factorized is None else self.factorized.split_kjt(features)
        return self.embedding_bag_collection(lookup), self.wide_collection(features)

    def embedded(self, fields: Any) -> dict[str, Tensor]:
        """Each field's pooled ``[B, D]`` by feature name from the field lookup's output
        (the first use waits for it); a factorized one projected / combined to ``D``."""
        pooled = fields.to_dict()
        return pooled if self.factorized is None else self.factorized.combine(pooled)


class CTRHead(nn.Module):
    """Everything after the lookups (module docstring): first order, FM, deep MLP.

    ``feature_names``: the fields in the order the MLP reads them (the pooled
    outputs are read by name, as torchrec's SparseArch does, not by position).
    """

    def __init__(
        self,
        *,
        feature_names: Sequence[str],
        deep_in_features: int,
        num_dense: int,
        layer_sizes: Sequence[int],
        fm: bool,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.num_dense = num_dense
        self.fm = fm
        # The dense features' first-order weights and the model's intercept.
        self.dense_linear = nn.Linear(num_dense, 1, device=device) if num_dense else None
        self.bias = None if num_dense else nn.Parameter(torch.zeros(1, device=device))
        # torchrec's OverArch (ReLU MLP, then a plain Linear to the logit): dense
        # QAT (compression/dense_qat.py) finds its Linears as it finds DLRM's.
        self.deep = OverArch(deep_in_features + num_dense, list(layer_sizes), device=device)

    def forward(
        self, dense: Tensor, pooled: dict[str, Tensor], weights: dict[str, Tensor]
    ) -> Tensor:
        """``pooled``: each field's ``[B, D_f]``, ``weights``: its wide row, by feature."""
        embedded = [pooled[name] for name in self.feature_names]  # F x (B x D_f)
        # Column 0 of each wide row (the others are padding, see the module docstring).
        first = torch.cat([weights[name][:, :1] for name in self.feature_names], dim=1)
        return self.combine(dense, embedded, first)

    def combine(self, dense: Tensor, embedded: list[Tensor], first: Tensor) -> Tensor:
        """The logits ``[B, 1]`` from plain tensors (what the serving program calls,
        compression/bundle.py): ``embedded`` the pooled fields in ``feature_names``
        order (F x ``[B, D_f]``), ``first`` their wide weights ``[B, F]`` (column 0)."""
        first = first.sum(1, keepdim=True)
        deep_in = torch.cat(embedded, dim=1)
        if self.dense_linear is not None:
            first = first + self.dense_linear(dense)
            deep_in = torch.cat((deep_in, dense), dim=1)
        else:
            first = first + self.bias
        logit = first + self.deep(deep_in)
        if self.fm:
            e = torch.stack(embedded, dim=1)  # B x F x D
            # sum_{f<g} <e_f, e_g> = ((sum_f e_f)^2 - sum_f e_f^2) / 2, summed over dims.
            logit = logit + 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1, keepdim=True)
        return logit


class CTRModel(nn.Module):
    """DeepFM (``fm=True``) or Wide&Deep: ``(dense, sparse) -> logits [B, 1]``.

    ``sparse_arch`` holds every table (so a distillation student can share the
    teacher's, and a frozen teacher freezes the rest); :meth:`logits_from_pooled`
    is the forward after the lookups (what the distillation pair calls).
    """

    def __init__(
        self,
        *,
        fields: EmbeddingBagCollection,
        wide: EmbeddingBagCollection,
        num_dense: int,
        layer_sizes: Sequence[int],
        fm: bool,
        factorized: Factorized | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if factorized is None:
            configs = fields.embedding_bag_configs()
            dims = {f: c.embedding_dim for c in configs for f in c.feature_names}
        else:  # the collection holds the stored tables; the head reads the model's
            dims = {f: s.dim for s in factorized.specs for f in s.feature_names}
        self.num_dense = num_dense
        self.sparse_arch = CTRSparseArch(fields, wide, factorized)
        self.head = CTRHead(
            feature_names=list(dims),
            deep_in_features=sum(dims.values()),
            num_dense=num_dense,
            layer_sizes=layer_sizes,
            fm=fm,
            device=device,
        )

    def logits_from_pooled(self, dense: Tensor, pooled: tuple[Any, Any]) -> Tensor:
        fields, wide = pooled  # to_dict (in embedded) waits for a lookup still in flight
        return self.head(dense, self.sparse_arch.embedded(fields), wide.to_dict())

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        return self.logits_from_pooled(dense_features, self.sparse_arch(sparse_features))


def wide_bag_configs(
    fields: Sequence[EmbeddingBagConfig], data_type: DataType = DataType.FP32
) -> list[EmbeddingBagConfig]:
    """One zero-initialized ``w_<table>`` per field table: same rows, features, pooling."""
    return [
        EmbeddingBagConfig(
            data_type=data_type,
            name=WIDE_PREFIX + c.name,
            num_embeddings=c.num_embeddings,
            embedding_dim=WIDE_DIM,
            feature_names=list(c.feature_names),
            pooling=c.pooling,
            # A module-level function (the export pickles the model); torch.nn.init.
            # constant_ also fills a ShardedTensor (each local shard) when sharded.
            init_fn=partial(torch.nn.init.constant_, val=0.0),
        )
        for c in fields
    ]


def build_ctr(
    *,
    arch: str,
    fields: Sequence[EmbeddingBagConfig],
    num_dense: int,
    over_arch_layer_sizes: Sequence[int],
    device: torch.device,
    tables_device: torch.device | None = None,
    data_type: DataType = DataType.FP32,
    factors: Sequence[FactorSpec] | None = None,
) -> CTRModel:
    """``arch="deepfm"`` or ``"wide_deep"`` over the field tables ``fields``.

    ``factors``: the field tables as factorized (trainer/models/factorized.py
    ``factor_specs``), or None: stored as they are. The wide tables follow ``fields``.
    """
    if arch not in ("deepfm", "wide_deep"):
        raise ValueError(f"build_ctr builds deepfm or wide_deep, not {arch!r}")
    if arch == "deepfm" and len({c.embedding_dim for c in fields}) > 1:
        raise ValueError("deepfm's FM term needs every field table of one embedding_dim")
    where = tables_device or device
    stored = stored_configs(factors, data_type) if factors else list(fields)
    return CTRModel(
        fields=EmbeddingBagCollection(tables=stored, device=where),
        wide=EmbeddingBagCollection(tables=wide_bag_configs(fields, data_type), device=where),
        num_dense=num_dense,
        layer_sizes=over_arch_layer_sizes,
        fm=arch == "deepfm",
        factorized=Factorized(factors, device=device) if factors else None,
        device=device,
    )
