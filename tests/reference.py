"""Unsharded references for the distributed tests: optimizers, the step, column blocks.

:func:`reference_optimizers` and :func:`reference_step` train one process the way
the sharded trainer trains (dense Adam, row-wise Adagrad tables).

torchrec runs FBGEMM's row-wise Adagrad on each table *shard*. A column-wise
shard (also table-column-wise and grid) holds a block of columns, so it keeps
one accumulator per row **per column block**: the mean squared gradient over
the block's columns, not over the whole row. An unsharded reference matches
that by making each column block its own parameter, concatenated back into the
table's weight by a parametrization, and giving the blocks to torchrec's
``RowWiseAdagrad``.

Example::

    bag = model.model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"]
    params = table_parameters(bag, width=4)    # [block0, block1] for a dim-8 table
    opt = RowWiseAdagrad(params, lr=0.1)       # bag.weight == torch.cat(params, dim=1)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.builder.model import build_unsharded
from trainer.config.schema import Config, OptimConfig
from trainer.config.tables import RunTables, run_tables

# Sharding types whose shards hold some of each row's columns.
COLUMN_SPLIT = {"column_wise", "table_column_wise", "grid_shard"}


class _Concat(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, *blocks: Tensor) -> Tensor:
        return torch.cat(blocks, dim=1)

    def right_inverse(self, weight: Tensor) -> list[Tensor]:
        return list(weight.split(self.width, dim=1))


def table_parameters(bag: nn.Module, *, width: int | None) -> list[nn.Parameter]:
    """The leaves the table optimizer updates: ``bag.weight``, or its column blocks.

    ``width``: the column block width of a column-split table; None keeps the
    weight whole. Register other parametrizations (e.g. fake quantization) after
    this one, so they see the whole rows.
    """
    if width is None:
        return [bag.weight]
    parametrize.register_parametrization(bag, "weight", _Concat(width))
    blocks = bag.parametrizations.weight
    return [getattr(blocks, f"original{i}") for i in range(bag.weight.shape[1] // width)]


def block_width(sharding_type: str, column_shard_dim: int | None) -> int | None:
    """The column block width the reference needs for a table sharded this way."""
    return column_shard_dim if sharding_type in COLUMN_SPLIT else None


def reference_optimizers(
    model: nn.Module, tables: list[nn.Parameter], optim: OptimConfig
) -> list[torch.optim.Optimizer]:
    """The trainer's optimizers, unsharded: Adam for the dense part, row-wise Adagrad for tables.

    ``tables`` are the leaves the fused optimizer owns when sharded (data-parallel
    tables are not among them: torchrec trains those with the dense optimizer).
    """
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=optim.dense_lr)]
    if tables:
        optimizers.append(RowWiseAdagrad(tables, lr=optim.embedding_lr, eps=optim.embedding_eps))
    return optimizers


def table_bags(model: nn.Module) -> dict[str, nn.Module]:
    """Every table of ``model`` by name, across its collections (a DeepFM / Wide&Deep's
    field and wide tables alike)."""
    return {
        name: bag
        for ebc in model.modules()
        if isinstance(ebc, EmbeddingBagCollection)
        for name, bag in ebc.embedding_bags.items()
    }


def reference_step(
    model: nn.Module,
    batch: Any,
    optimizers: list[torch.optim.Optimizer],
) -> float:
    """One step on the global batch; returns the loss.

    The gradients are those of the global batch's mean loss, tables included:
    torchrec divides the backward all-to-all / reduce-scatter by the group size
    (``comm_ops`` gradient division, on by default), as DDP averages the dense
    gradients (see tests/test_sharding_equivalence.py): nothing is rescaled.
    """
    loss, _ = model(batch)
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def synthetic_tables(cfg: Config) -> RunTables:
    """The run's tables of a ``data=synthetic`` config (known from ``cfg.data`` alone)."""
    return run_tables(cfg, features=cfg.data.features)


def unsharded_model(cfg: Config, *, device: torch.device) -> nn.Module:
    """The unsharded model of a ``data=synthetic`` config, on ``device``."""
    return build_unsharded(
        cfg.model, tables=synthetic_tables(cfg), num_dense=cfg.data.num_dense, device=device
    )
