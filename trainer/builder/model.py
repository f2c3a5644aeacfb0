"""The model as configured: on ``meta`` before sharding, or unsharded on a device.

:func:`build_unsharded` builds the configured architecture over the run's
tables; :func:`build_trained` is the fp32 CPU model a trained state dict loads
into (what the converters wrap around it included), for the export.

Example::

    model = build_unsharded(cfg.model, tables=tables, num_dense=13, device=torch.device("meta"))
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType

from compression.converter import Converters
from trainer.config.schema import ModelConfig
from trainer.config.tables import RunTables
from trainer.models import build_model
from trainer.models.collision import id_management


def build_unsharded(
    model: ModelConfig,
    *,
    tables: RunTables,
    num_dense: int,
    device: torch.device,
    table_data_type: DataType = DataType.FP32,
) -> torch.nn.Module:
    """The model as configured over the run's tables, on ``device`` (``meta`` before sharding)."""
    return build_model(
        arch=model.arch,
        tables=tables.model,
        num_dense=num_dense,
        dense_arch_layer_sizes=model.dense_arch_layer_sizes,
        over_arch_layer_sizes=model.over_arch_layer_sizes,
        dcn_num_layers=model.dcn_num_layers,
        dcn_low_rank_dim=model.dcn_low_rank_dim,
        device=device,
        table_data_type=table_data_type,
        id_management=id_management(model),
    )


def build_trained(
    model: ModelConfig, *, tables: RunTables, num_dense: int, converters: Converters
) -> nn.Module:
    """The unsharded fp32 cpu model the trained state dict loads into (converters included)."""
    trained = build_unsharded(model, tables=tables, num_dense=num_dense, device=torch.device("cpu"))
    trained = converters.wrap_model(trained)  # e.g. the distillation pair
    converters.prepare_trained(trained)
    return trained
