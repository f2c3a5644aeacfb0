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

from pathlib import Path

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

PROGRAM_FILE = "model.pt2"
# Byte alignment of each TBE's storage inside the one packed buffer (FBGEMM's rows).
_ALIGN = 16
_MAX_D = ("max_int2_D", "max_int4_D", "max_int8_D", "max_float16_D", "max_float32_D")


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
        embedded_sparse = self.tables(ids, lengths)
        embedded_dense = self.dense_arch(dense)
        concatenated = self.inter_arch(
            dense_features=embedded_dense, sparse_features=embedded_sparse
        )
        return torch.sigmoid(self.over_arch(concatenated)).flatten()


def serving_program(served: nn.Module, *, feature_names: list[str]) -> ServingProgram:
    """The plain program of a DLRM quantized by ``quantize_for_serving``.

    ``feature_names``: the input order of the sparse features (the KJT keys the
    trainer's batches carry). The served model is left unchanged; the program
    shares its dense layers and copies its packed rows.
    """
    ebcs = [m for m in served.modules() if isinstance(m, QuantEmbeddingBagCollection)]
    dlrm_parts = ("sparse_arch", "dense_arch", "inter_arch", "over_arch")
    if len(ebcs) != 1 or not all(hasattr(served, p) for p in dlrm_parts):
        raise UnsupportedModel(
            "serving_program needs a DLRM quantized by compression.serving.quantize_for_serving "
            "(sparse/dense/inter/over arch, one quantized EmbeddingBagCollection), got "
            f"{type(served).__name__} with {len(ebcs)}"
        )
    ebc = ebcs[0]
    # Per feature of the collection: (packed storage index, feature index in its TBE).
    where: dict[str, tuple[int, int]] = {}
    names = iter(ebc._feature_names)
    for k, split in enumerate(ebc._feature_splits):
        for i in range(split):
            where[next(names)] = (k, i)
    missing = sorted(set(feature_names) ^ set(where))
    if missing:
        raise ValueError(
            f"feature_names {feature_names} do not match the model's features {list(where)}"
        )
    tbes: list[IntNBitTableBatchedEmbeddingBagsCodegen] = ebc._emb_modules
    storages, bases, base = [], [], 0
    for tbe in tbes:
        storage = tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev
        pad = (-storage.numel()) % _ALIGN
        storages.append(torch.cat([storage, storage.new_zeros(pad)]))
        bases.append(base)
        base += storages[-1].numel()
    offsets, tys, dims, rows, modes = [], [], [], [], []
    for name in feature_names:
        k, i = where[name]
        tbe = tbes[k]
        offsets.append(int(tbe.weights_offsets[i]) + bases[k])
        tys.append(int(tbe.weights_tys[i]))
        dims.append(int(tbe.D_offsets[i + 1] - tbe.D_offsets[i]))
        rows.append(int(tbe.rows_per_table[tbe.feature_table_map[i]]))
        modes.append(int(tbe.pooling_mode))
    model_order_names = list(served.sparse_arch.sparse_feature_names)
    if len(set(dims)) != 1:
        raise UnsupportedModel(
            f"serving_program needs one embedding dim for every feature, got {dims}"
        )
    tables = PackedTables(
        weights=torch.cat(storages).clone(),
        weights_offsets=torch.tensor(offsets, dtype=torch.int64),
        weights_tys=torch.tensor(tys, dtype=torch.uint8),
        dims=dims,
        rows=torch.tensor(rows, dtype=torch.int64),
        pooling_modes=modes,
        max_d={a: max(int(getattr(t, a)) for t in tbes) for a in _MAX_D},
        row_alignment=int(tbes[0].row_alignment),
        model_order=[feature_names.index(n) for n in model_order_names],
    )
    return ServingProgram(tables, served).eval()


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
