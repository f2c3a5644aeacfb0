"""The quantized model that gets served: quantize the trained tables, pack their rows.

Three steps, each a plain function:

1. :func:`gather_full_state` (a collective; the export's fallback for models the
   streamed export does not cover, see trainer/export/stream.py) rebuilds the
   unsharded state dict on rank 0 from every rank's table shards
   (``ShardedTensor`` local shards, sent to rank 0 with ``gather_object``);
   data-parallel tables and dense parameters are replicated plain tensors and
   are taken from rank 0 as they are.
2. :func:`quantize_for_serving` swaps the ``EmbeddingBagCollection`` of an
   unsharded fp32 model for torchrec's quantized inference twin
   (``torchrec.quant.embedding_modules.EmbeddingBagCollection``, FBGEMM's
   ``IntNBitTableBatchedEmbeddingBagsCodegen`` underneath) through
   ``torchrec.inference.modules.quantize_inference_model``. Each table gets
   ``SERVING_DTYPES[bits]`` (the format QAT trained against, see
   compression/fake_quant.py); tables not in ``table_bits`` are kept fp32
   (torchrec's default would be int8). Dense layers stay fp32.
3. :func:`pack_rows` packs the rows of one table (or of one row-wise shard of
   it) into FBGEMM's serving layout, byte for byte what step 2 writes into its
   TBE: the export streams tables through it, one at a time
   (trainer/export/stream.py), and compression/bundle.py builds the served
   program from the packed rows. Nothing is pickled: the served model is the
   bundle's ``torch.export`` program (compression/bundle.py: ``load_program``).

Because quantization is per row, a served row is exactly
``fake_quantize_rows(row, bits)``: the exported model's logits equal those of the
fp32 model whose quantized tables were replaced by their fake-quantized rows
(measured: bit for bit on CPU).

Example::

    full = gather_full_state(dmp)                 # every rank calls it
    if full is not None:                          # rank 0
        model = build_unsharded(cfg, device=torch.device("cpu"))
        model.load_state_dict(full)
        served = quantize_for_serving(model.model, table_bits={"t_cat_0": 4, "t_cat_1": 8})
        print(model_bytes(model.model), "->", model_bytes(served))
        packed = pack_rows(model.model.sparse_arch.embedding_bag_collection
                           .embedding_bags["t_cat_0"].weight, bits=4)   # uint8[rows, 16]

From a saved checkpoint, in one process (no torchrun): ``python -m
trainer.export`` (the trainer knows how to rebuild the model). This package
never imports ``trainer``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import chain

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
    rounded_row_size_in_bytes,
)
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.inference.modules import quantize_inference_model
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from compression.fake_quant import SERVING_DTYPES, check_bits, fake_quantize_rows
from compression.row_range import check_range, clamp_to_fitted
from sharding.state import assemble, local_shards

# Where FBGEMM's inference TBE keeps its quantized rows (plain attributes, not
# buffers; the per-table ``weight`` buffers torchrec registers are views of them).
_TBE_STORAGE = ("weights_dev", "weights_host", "weights_uvm")


def gather_full_state(model: nn.Module) -> dict[str, Tensor] | None:
    """Collective: the full unsharded state dict (cpu) on rank 0, None elsewhere.

    Every rank sends its table shards to rank 0, so rank 0 needs host memory
    for the whole model. Without a process group (or with one rank) the local
    state is complete and is returned as it is.
    """
    state = model.state_dict()
    pieces = local_shards(model, suffix="")
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if distributed:
        gathered: list[dict[str, list[tuple]]] | None = (
            [{} for _ in range(dist.get_world_size())] if rank == 0 else None
        )
        dist.gather_object(pieces, gathered, dst=0)
    else:
        gathered = [pieces]
    if rank != 0:
        return None
    assert gathered is not None
    full: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            dtype = value.metadata().tensor_properties.dtype
            full[key] = assemble([g[key] for g in gathered], tuple(value.size()), dtype)
            assert not full[key].isnan().any(), f"{key}: shards do not cover the tensor"
        else:
            full[key] = value.detach().cpu().clone()
    return full


def quantize_for_serving(
    model: nn.Module, *, table_bits: dict[str, int], row_range: str = "minmax"
) -> nn.Module:
    """A quantized copy of an unsharded fp32 model (``model`` is left unchanged).

    ``table_bits``: per table name, 8, 4 or 2 (torchrec's INT8 / INT4 / INT2
    row-wise formats); tables left out are served in fp32. ``row_range="mse"``:
    each row's scale and bias come from its fitted range instead of its min/max
    (the copy's rows are clamped to it first, see compression/row_range.py).
    """
    check_range(row_range)
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    if not ebcs:
        raise ValueError(
            "quantize_for_serving needs an unsharded model with a torchrec "
            "EmbeddingBagCollection (e.g. trainer.builder.model.build_unsharded), not a sharded one"
        )
    names = [t.name for ebc in ebcs for t in ebc.embedding_bag_configs()]
    unknown = sorted(set(table_bits) - set(names))
    if unknown:
        raise ValueError(f"table_bits names tables the model does not have: {unknown}")
    for name, bits in table_bits.items():
        check_bits(bits, what=f"table_bits[{name!r}]")
    dtypes = {
        name: SERVING_DTYPES[table_bits[name]] if name in table_bits else torch.float
        for name in names
    }
    model = copy.deepcopy(model)
    if row_range != "minmax":
        _rewrite_tables(model, table_bits, clamp_to_fitted)
    served = quantize_inference_model(model, per_table_weight_dtype=dtypes)
    for ebc in served.modules():
        if isinstance(ebc, QuantEmbeddingBagCollection):
            # torchrec keeps the unaligned quantized rows it built the TBE from: a
            # second copy of every table, in memory and in the saved file. Only a
            # float module's copy is ever read again (managed-collision conversion).
            ebc._table_name_to_quantized_weights = None
    return served


@torch.no_grad()
def fake_quantize_tables(
    model: nn.Module, *, table_bits: dict[str, int], row_range: str = "minmax"
) -> None:
    """In place: each listed table of an unsharded model holds the rows serving reads.

    The fp32 model then computes what its quantized export computes (and what
    QAT's eval forward computes), with plain fp32 kernels.
    """
    _rewrite_tables(
        model, table_bits, lambda rows, bits: fake_quantize_rows(rows, bits, row_range=row_range)
    )


@torch.no_grad()
def _rewrite_tables(
    model: nn.Module, table_bits: dict[str, int], rewrite: Callable[[Tensor, int], Tensor]
) -> None:
    """In place: each listed table's rows become ``rewrite(rows, its bits)``."""
    for ebc in (m for m in model.modules() if isinstance(m, EmbeddingBagCollection)):
        for name, bag in ebc.embedding_bags.items():
            if name in table_bits:
                bag.weight.copy_(rewrite(bag.weight, table_bits[name]))


def model_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers, quantized table storage included, each once.

    Counted per storage, so views (torchrec's per-table ``weight`` buffers of a
    quantized collection) are not counted twice; quantized rows include FBGEMM's
    per-row fp16 scale and bias and its row alignment padding.
    """
    storages: dict[tuple[str, int], int] = {}

    def add(tensor: Tensor) -> None:
        # torchrec's packed UInt4Tensor / UInt2Tensor wrap a uint8 tensor (``elem``).
        tensor = getattr(tensor, "elem", tensor)
        if tensor.numel() == 0 or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()

    for tensor in chain(module.parameters(), module.buffers()):
        add(tensor)
    for tbe in module.modules():
        if isinstance(tbe, IntNBitTableBatchedEmbeddingBagsCodegen):
            for name in _TBE_STORAGE:
                add(getattr(tbe, name))
    return sum(storages.values())


def table_bytes(module: nn.Module) -> int:
    """:func:`model_bytes` of the embedding tables alone (fp32 or quantized collections)."""
    collections = (EmbeddingBagCollection, QuantEmbeddingBagCollection)
    return sum(model_bytes(m) for m in module.modules() if isinstance(m, collections))


@torch.no_grad()
def pack_rows(rows: Tensor, *, bits: int | None, row_range: str = "minmax") -> Tensor:
    """FBGEMM's packed serving rows of ``rows`` (fp32 ``[n, dim]``): ``uint8[n, row_bytes]``.

    Byte for byte what :func:`quantize_for_serving` writes into its TBE for these
    rows (it is called on a one-table copy): ``bits`` 8/4/2 give the row-wise
    INT8/INT4/INT2 rows (fp16 scale and bias in front of the codes), ``None``
    the fp32 rows, each padded to FBGEMM's row alignment. Quantization is per
    row, so packing a row-wise shard gives the rows packing its whole table
    gives; a column slice is not a row (its min/max is not the row's).

    Example::

        packed = pack_rows(torch.randn(5, 8), bits=4)   # uint8[5, 16]
    """
    num_rows, dim = rows.shape
    config = EmbeddingBagConfig(
        name="t", embedding_dim=dim, num_embeddings=max(num_rows, 1), feature_names=["f"]
    )
    holder = nn.Module()
    holder.ebc = EmbeddingBagCollection(tables=[config], device=torch.device("cpu"))
    if num_rows:
        holder.ebc.embedding_bags["t"].weight.copy_(rows.float())
    served = quantize_for_serving(
        holder, table_bits={"t": bits} if bits else {}, row_range=row_range
    )
    tbe = served.ebc._emb_modules[0]
    storage = tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev
    row_bytes = rounded_row_size_in_bytes(
        dim, SparseType.from_int(int(tbe.weights_tys[0])), int(tbe.row_alignment)
    )
    return storage[: num_rows * row_bytes].view(num_rows, row_bytes).clone()
