"""The quantized model that gets served: gather the trained tables, quantize, save.

Three steps, each a plain function:

1. :func:`gather_full_state` (a collective) rebuilds the unsharded state dict on
   rank 0 from every rank's table shards (``ShardedTensor`` local shards, sent to
   rank 0 with ``gather_object``); data-parallel tables and dense parameters are
   replicated plain tensors and are taken from rank 0 as they are.
2. :func:`quantize_for_serving` swaps the ``EmbeddingBagCollection`` of an
   unsharded fp32 model for torchrec's quantized inference twin
   (``torchrec.quant.embedding_modules.EmbeddingBagCollection``, FBGEMM's
   ``IntNBitTableBatchedEmbeddingBagsCodegen`` underneath) through
   ``torchrec.inference.modules.quantize_inference_model``. Each table gets
   ``SERVING_DTYPES[bits]`` (the format QAT trained against, see
   compression/fake_quant.py); tables not in ``table_bits`` are kept fp32
   (torchrec's default would be int8). Dense layers stay fp32.
3. :func:`save_exported` pickles the whole quantized module (``torch.save``);
   :func:`load_exported` reads it back (``weights_only=False``: the file holds
   torchrec/FBGEMM module classes, so load only files you trust).

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
        save_exported(served, run_dir / "exported_model.pt")

From a saved checkpoint, in one process (no torchrun): ``python -m
trainer.export`` (the trainer knows how to rebuild the model). This package
never imports ``trainer``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.inference.modules import quantize_inference_model
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


def save_exported(module: nn.Module, path: Path | str) -> None:
    """Pickles the whole module (it reloads without knowing how it was built)."""
    torch.save(module, path)


def load_exported(path: Path | str, *, map_location: str | None = None) -> nn.Module:
    """Reads a :func:`save_exported` file back; only for files you trust (pickle)."""
    return torch.load(path, map_location=map_location, weights_only=False)
