"""The served model as one ``torch.export`` program over plain tensors.

:func:`serving_program` turns a model quantized by
``compression.serving.quantize_for_serving`` (torchrec's quantized
``EmbeddingBagCollection`` on FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``)
into a plain :class:`ServingProgram`: its tables are one :class:`PackedTables`,
whose buffers are the TBEs' packed rows (codes with their fp16 scale/bias, byte
for byte what the quantizer wrote, so what QAT trained against) and their
offsets/types, read by FBGEMM's functional op
``torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function``; the dense
layers are the model's own (fp32, or ``Int8WeightOnlyLinear``'s int8 codes times
scales), traced to aten ops. No torchrec class is left in the program.

Why not export the torchrec module: the TBE holds ``torch.classes.fbgemm.AtomicCounter``
script objects with no fake class, so ``torch.export`` fails on it
(pytorch#139911); the functional op has a Meta kernel (registered by
``import fbgemm_gpu``) and exports as one call.

The program's inputs are plain tensors::

    dense    float32[B, num_dense]
    ids      int64[N]                    every feature's ids, feature-major
    lengths  int64[num_features * B]     ids per (feature, sample), torchrec's KJT order

and it returns ``float32[B]`` click probabilities. Ids outside a feature's rows
read row 0 (FBGEMM's ``BoundsCheckMode.WARNING``, the eager TBE's default).

Loading needs torch and ``fbgemm_gpu`` only (the op registrations), no pickled
Python objects::

    import fbgemm_gpu, torch
    program = torch.export.load("bundle/model.pt2").module()
    scores = program(dense, ids, lengths)

Example::

    served = quantize_for_serving(dlrm, table_bits={"t_cat_0": 4})
    program = serving_program(served, feature_names=["cat_0", "cat_1"])
    save_program(program, Path("bundle/model.pt2"), num_dense=13, example_batch=8)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import Tensor, nn
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

PROGRAM_FILE = "model.pt2"
# Byte alignment of each TBE's storage inside the one packed buffer (FBGEMM's rows).
_ALIGN = 16
_MAX_D = ("max_int2_D", "max_int4_D", "max_int8_D", "max_float16_D", "max_float32_D")
# FBGEMM SparseType value (FP32 0, FP16 1, INT8 2, INT4 3, INT2 4) -> its _MAX_D slot.
_TY_SLOT = {0: 4, 1: 3, 2: 2, 3: 1, 4: 0}


class UnsupportedModel(ValueError):
    """The served model is not a DLRM this program builder knows (names what it found)."""


class PackedTables(nn.Module):
    """Pooled lookups of every feature (input order) from FBGEMM's packed rows.

    Buffers only: ``weights`` (uint8, every table's rows), per feature its
    ``weights_offsets`` (bytes), ``weights_tys`` (FBGEMM's SparseType),
    ``D_offsets`` and ``rows``; ``model_order`` permutes the pooled features
    into the order the interaction reads them.
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
        self.register_buffer("model_order", torch.tensor(model_order, dtype=torch.int64))
        # One lookup per pooling mode; each feature keeps the columns of its own.
        self.modes = sorted(set(pooling_modes))
        for mode in self.modes:
            mask = torch.tensor([m == mode for m in pooling_modes])
            self.register_buffer(f"mask_{mode}", mask.repeat_interleave(torch.tensor(dims)))
        self.num_features = num_features
        self.dim = dims[0]
        self.total_d = sum(dims)
        self.max_d = dict(max_d)
        self.row_alignment = row_alignment

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, num_features, dim]`` pooled embeddings, in the model's feature order."""
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
        return pooled.view(-1, self.num_features, self.dim).index_select(1, self.model_order)


class ServingProgram(nn.Module):
    """``(dense, ids, lengths) -> probabilities``: the tables, then the DLRM's dense layers."""

    def __init__(self, tables: PackedTables, dlrm: nn.Module) -> None:
        super().__init__()
        self.tables = tables
        self.dense_arch = dlrm.dense_arch
        self.inter_arch = dlrm.inter_arch
        self.over_arch = dlrm.over_arch

    def forward(self, dense: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(dense, ids, lengths))

    def logits(self, dense: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """``float32[B]`` logits (eager only: the exported program is ``forward``)."""
        embedded_sparse = self.tables(ids, lengths)
        embedded_dense = self.dense_arch(dense)
        concatenated = self.inter_arch(
            dense_features=embedded_dense, sparse_features=embedded_sparse
        )
        return self.over_arch(concatenated).flatten()


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
    input order; ``model_order``: the order the interaction reads the pooled
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


def serving_program(served: nn.Module, *, feature_names: list[str]) -> ServingProgram:
    """The plain program of a DLRM quantized by ``quantize_for_serving``.

    ``feature_names``: the input order of the sparse features (the KJT keys the
    trainer's batches carry). The served model is left unchanged; the program
    shares its dense layers and copies its packed rows (:func:`tbe_tables`).
    """
    ebcs = [m for m in served.modules() if isinstance(m, QuantEmbeddingBagCollection)]
    dlrm_parts = ("sparse_arch", "dense_arch", "inter_arch", "over_arch")
    if len(ebcs) != 1 or not all(hasattr(served, p) for p in dlrm_parts):
        raise UnsupportedModel(
            "serving_program needs a DLRM quantized by compression.serving.quantize_for_serving "
            "(sparse/dense/inter/over arch, one quantized EmbeddingBagCollection), got "
            f"{type(served).__name__} with {len(ebcs)}"
        )
    tables, feature_tables = tbe_tables(ebcs[0])
    return dlrm_program(
        tables,
        feature_tables=feature_tables,
        feature_names=feature_names,
        model_order=list(served.sparse_arch.sparse_feature_names),
        dlrm=served,
    )


def dlrm_program(
    tables: dict[str, PackedTable],
    *,
    feature_tables: dict[str, str],
    feature_names: list[str],
    model_order: list[str],
    dlrm: nn.Module,
) -> ServingProgram:
    """:class:`ServingProgram` of packed ``tables`` and ``dlrm``'s dense layers (shared)."""
    dims = {t.dim for t in tables.values()}
    if len(dims) != 1:
        raise UnsupportedModel(
            f"serving_program needs one embedding dim for every feature, got {sorted(dims)}"
        )
    if not all(hasattr(dlrm, p) for p in ("dense_arch", "inter_arch", "over_arch")):
        raise UnsupportedModel(f"{type(dlrm).__name__} is not a DLRM (dense/inter/over arch)")
    packed = packed_tables(
        tables, feature_tables=feature_tables, feature_names=feature_names, model_order=model_order
    )
    return ServingProgram(packed, dlrm).eval()


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


def export_program(
    program: ServingProgram, *, num_dense: int, example_batch: int = 4
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``program`` with a dynamic batch and number of ids."""
    num_features = program.tables.num_features
    dense = torch.zeros(example_batch, num_dense)
    lengths = torch.ones(num_features * example_batch, dtype=torch.int64)
    ids = torch.zeros(num_features * example_batch, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=2, max=1 << 24)
    num_ids = torch.export.Dim("num_ids", min=2, max=1 << 31)
    shapes = {"dense": {0: batch}, "ids": {0: num_ids}, "lengths": {0: num_features * batch}}
    with torch.no_grad():
        return torch.export.export(program, (dense, ids, lengths), dynamic_shapes=shapes)


def save_program(program: ServingProgram, path: Path, *, num_dense: int) -> None:
    """Exports ``program`` and writes it with ``torch.export.save`` (a .pt2 archive)."""
    torch.export.save(export_program(program, num_dense=num_dense), path)


def load_program(path: Path | str) -> nn.Module:
    """The callable of a saved program (needs ``fbgemm_gpu`` for the op, nothing pickled)."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    return torch.export.load(str(path)).module()
