"""Moving weights between an unsharded state dict and a sharded model.

``load_unsharded`` writes full (unsharded) tensors into a
DistributedModelParallel: each rank copies just the rows/columns its shards
own, found from the shard metadata. ``local_shards`` is the reverse view: the
pieces this rank holds, with their offsets, for reassembly elsewhere. The
equivalence tests use both to start a sharded and an unsharded model from the
same weights and to compare the embedding rows they end with.

Example::

    load_unsharded(dmp, reference.state_dict())
    pieces = local_shards(dmp)   # {"...t_cat_0.weight": [((0, 0), tensor), ...]}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _pieces(value: Any) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    if hasattr(value, "to_local") and hasattr(value, "device_mesh"):  # DTensor
        raise NotImplementedError(
            "DTensor state is not handled yet; torchrec 1.8 uses ShardedTensor"
        )
    return [((0,) * value.dim(), value)]


@torch.no_grad()
def load_unsharded(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copies each full tensor's slice into the local shard(s) that own it."""
    state = model.state_dict()
    missing = sorted(set(state) - set(full_state))
    if missing:
        raise KeyError(f"full state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for key, value in state.items():
        full = full_state[key]
        for offsets, local in _pieces(value):
            index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
            local.copy_(full[index].to(local.device, local.dtype))


def local_shards(model: nn.Module, *, suffix: str = ".weight") -> dict[str, list[tuple]]:
    """This rank's pieces of every sharded tensor, as ``(offsets, cpu tensor)``."""
    out: dict[str, list[tuple]] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor) and key.endswith(suffix):
            out[key] = [(o, t.detach().cpu().clone()) for o, t in _pieces(value)]
    return out


def assemble(
    pieces: list[list[tuple]], shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reassembles a full tensor from every rank's ``local_shards`` pieces."""
    full = torch.full(shape, float("nan"), dtype=dtype)
    for rank_pieces in pieces:
        for offsets, tensor in rank_pieces:
            index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
            full[index] = tensor.to(dtype)
    return full


def local_table_bytes(model: nn.Module) -> int:
    """Bytes of embedding-table weights this rank holds (shards and replicas)."""
    total = 0
    for key, value in model.state_dict().items():
        if "embedding_bags" not in key or not key.endswith(".weight"):
            continue
        for _, tensor in _pieces(value):
            total += tensor.numel() * tensor.element_size()
    return total
