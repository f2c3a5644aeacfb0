"""The served model's tables: FBGEMM's packed rows read by its functional nbit lookup.

:class:`PackedTable` is one table's packed rows (compression/serving.py:
``pack_rows``, or copied out of a quantized collection's TBEs by
:func:`tbe_tables`); :func:`packed_tables` lays the tables of one collection
out as one :class:`PackedTables`, whose buffers are read by
``torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function`` (it has a
Meta kernel, registered by ``import fbgemm_gpu``, so it exports as one call).
compression/bundle.py builds the served program over one or more of them.

Example::

    tables, feature_tables = tbe_tables(quantized_ebc)
    lookups = packed_tables(tables, feature_tables=feature_tables,
                            feature_names=["cat_0", "cat_1"], model_order=["cat_0", "cat_1"])
    pooled = lookups(ids, lengths)          # float32[B, total_D], model order
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import Tensor, nn
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

# Byte alignment of each TBE's storage inside the one packed buffer (FBGEMM's rows).
_ALIGN = 16
_MAX_D = ("max_int2_D", "max_int4_D", "max_int8_D", "max_float16_D", "max_float32_D")
# FBGEMM SparseType value (FP32 0, FP16 1, INT8 2, INT4 3, INT2 4) -> its _MAX_D slot.
_TY_SLOT = {0: 4, 1: 3, 2: 2, 3: 1, 4: 0}


class PackedTables(nn.Module):
    """Pooled lookups of every feature (input order) from FBGEMM's packed rows.

    Buffers only: ``weights`` (uint8, every table's rows), per feature its
    ``weights_offsets`` (bytes), ``weights_tys`` (FBGEMM's SparseType),
    ``D_offsets`` and ``rows``; ``model_columns`` permutes the pooled columns
    into the order the model reads the features in (``model_order``, a
    permutation of the input's); ``model_dims`` are the features' dims in it.
    """

    def __init__(
        self,
        *,
        weights: Tensor,
        weights_offsets: Tensor,
        weights_tys: Tensor,
        dims: list[int],
        rows: Tensor,
        pooling_modes: list[int],
        max_d: dict[str, int],
        row_alignment: int,
        model_order: list[int],
    ) -> None:
        super().__init__()
        num_features = len(dims)
        self.register_buffer("weights", weights)
        self.register_buffer("uvm_weights", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("placements", torch.full((num_features,), 3, dtype=torch.int32))
        self.register_buffer("weights_offsets", weights_offsets)
        self.register_buffer("weights_tys", weights_tys)
        d_offsets = torch.tensor([0, *dims], dtype=torch.int64).cumsum(0).to(torch.int32)
        self.register_buffer("D_offsets", d_offsets)
        self.register_buffer("rows", rows)
        starts = d_offsets.tolist()
        columns = [c for f in model_order for c in range(starts[f], starts[f + 1])]
        self.register_buffer("model_columns", torch.tensor(columns, dtype=torch.int64))
        self.model_dims = [dims[f] for f in model_order]
        # One lookup per pooling mode; each feature keeps the columns of its own.
        self.modes = sorted(set(pooling_modes))
        for mode in self.modes:
            mask = torch.tensor([m == mode for m in pooling_modes])
            self.register_buffer(f"mask_{mode}", mask.repeat_interleave(torch.tensor(dims)))
        self.num_features = num_features
        self.total_d = sum(dims)
        self.max_d = dict(max_d)
        self.row_alignment = row_alignment

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``float32[B, total_D]``: each feature's pooled embedding (``model_dims``
        columns each), in the model's feature order."""
        batch = lengths.shape[0] // self.num_features
        # Ids out of a feature's rows read row 0; lengths past the ids end there.
        rows = self.rows.repeat_interleave(batch).repeat_interleave(
            lengths, output_size=ids.shape[0]
        )
        ids = torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).clamp(max=ids.shape[0])
        pooled = None
        for mode in self.modes:
            out = torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
                dev_weights=self.weights,
                uvm_weights=self.uvm_weights,
                weights_placements=self.placements,
                weights_offsets=self.weights_offsets,
                weights_tys=self.weights_tys,
                D_offsets=self.D_offsets,
                total_D=self.total_d,
                max_int2_D=self.max_d["max_int2_D"],
                max_int4_D=self.max_d["max_int4_D"],
                max_int8_D=self.max_d["max_int8_D"],
                max_float16_D=self.max_d["max_float16_D"],
                max_float32_D=self.max_d["max_float32_D"],
                indices=ids,
                offsets=offsets,
                pooling_mode=mode,
                indice_weights=None,
                output_dtype=0,  # SparseType.FP32
                row_alignment=self.row_alignment,
            )
            pooled = (
                out if pooled is None else torch.where(getattr(self, f"mask_{mode}"), out, pooled)
            )
        assert pooled is not None
        return pooled.index_select(1, self.model_columns)


@dataclass
class PackedTable:
    """One table as served: ``rows`` uint8[n, row_bytes] in FBGEMM's packed layout
    (compression/serving.py: ``pack_rows``), ``ty`` its FBGEMM ``SparseType`` value,
    ``dim`` its embedding dim, ``pooling`` FBGEMM's pooling mode (0 sum, 1 mean)."""

    rows: Tensor
    ty: int
    dim: int
    pooling: int = 0


def packed_tables(
    tables: dict[str, PackedTable],
    *,
    feature_tables: dict[str, str],
    feature_names: list[str],
    model_order: list[str],
) -> PackedTables:
    """The lookup module over ``tables`` (emptied as their rows are copied in).

    ``feature_tables``: the table each feature reads; ``feature_names``: the
    input order; ``model_order``: the order the model reads the pooled
    features in. Tables are laid out in the order their first feature comes, so
    the same packed rows always give the same ``weights`` buffer, byte for byte.
    """
    missing = sorted(set(feature_names) ^ set(feature_tables))
    if missing or set(model_order) != set(feature_names):
        raise ValueError(f"features {feature_names} do not match the model's {missing}")
    order = list(dict.fromkeys(feature_tables[f] for f in feature_names))
    sizes = {t: tables[t].rows.numel() for t in order}
    weights = torch.empty(sum(sizes.values()), dtype=torch.uint8)
    bases, base = {}, 0
    specs = {
        t: (tables[t].ty, tables[t].dim, tables[t].pooling, tables[t].rows.shape[0]) for t in order
    }
    for t in order:  # copied in and dropped one table at a time: one table in flight
        rows = tables.pop(t).rows
        if rows.shape[0] and rows.shape[1] % _ALIGN:
            raise ValueError(
                f"table {t}: packed rows of {rows.shape[1]} bytes, not {_ALIGN}-aligned"
            )
        weights[base : base + sizes[t]] = rows.reshape(-1)
        bases[t], base = base, base + sizes[t]
    max_d = dict.fromkeys(_MAX_D, 0)
    for ty, dim, _, _ in specs.values():
        key = _MAX_D[_TY_SLOT[ty]]
        max_d[key] = max(max_d[key], dim)
    per_feature = [specs[feature_tables[f]] for f in feature_names]
    return PackedTables(
        weights=weights,
        weights_offsets=torch.tensor([bases[feature_tables[f]] for f in feature_names]),
        weights_tys=torch.tensor([p[0] for p in per_feature], dtype=torch.uint8),
        dims=[p[1] for p in per_feature],
        rows=torch.tensor([p[3] for p in per_feature], dtype=torch.int64),
        pooling_modes=[p[2] for p in per_feature],
        max_d=max_d,
        row_alignment=_ALIGN,
        model_order=[feature_names.index(n) for n in model_order],
    )


def tbe_tables(
    ebc: QuantEmbeddingBagCollection,
) -> tuple[dict[str, PackedTable], dict[str, str]]:
    """Each table's packed rows, copied out of a quantized collection's TBEs, and the
    table of each feature."""
    feature_tables = {f: c.name for c in ebc.embedding_bag_configs() for f in c.feature_names}
    tables: dict[str, PackedTable] = {}
    names = iter(ebc._feature_names)
    for tbe in ebc._emb_modules:
        storage = tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev
        for i in range(len(tbe.feature_table_map)):
            table = feature_tables[next(names)]
            ty = int(tbe.weights_tys[i])
            dim = int(tbe.D_offsets[i + 1] - tbe.D_offsets[i])
            num_rows = int(tbe.rows_per_table[tbe.feature_table_map[i]])
            row_bytes = rounded_row_size_in_bytes(
                dim, SparseType.from_int(ty), int(tbe.row_alignment)
            )
            start = int(tbe.weights_offsets[i])
            rows = storage[start : start + num_rows * row_bytes].view(num_rows, row_bytes)
            tables[table] = PackedTable(rows.clone(), ty, dim, int(tbe.pooling_mode))
    return tables, feature_tables
