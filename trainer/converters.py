"""The run's compression converters, built once from config, in one documented order.

The order, and why:

1. **precision** -- decides the tables' storage dtype before the meta model is
   built and wraps the forward in autocast innermost (everything else sees
   the autocast forward);
2. **table QAT** -- hooks the sharded FBGEMM kernels, so after sharding; at
   export it quantizes the tables (QAT bits, or ``trainer.export_bits`` for
   post-training quantization when QAT is off);
3. **dense QAT** -- parametrizes the Linears DDP holds, after sharding; served
   as int8 weight-only Linears (swapped before the tables are quantized);
4. **loss scaling** (fp16) -- outermost: it wraps the optimizer the others
   produced and scales the loss the autocast forward returns.

Distillation (a teacher/student pair built before planning) and pruning will
slot in here; nothing else in the trainer names a technique.

Example::

    converters = build_converters(cfg, tables=tables, device_type="cpu")
"""

from __future__ import annotations

from collections.abc import Sequence

from compression.converter import Converter, Converters
from compression.converters import DenseQAT, LossScaling, PrecisionConverter, TableQAT
from compression.precision import resolve_precision
from trainer.config import Config, ConfigError, TableConfig, qat_bits


def export_bits(cfg: Config, tables: Sequence[TableConfig]) -> dict[str, int]:
    """The QAT bits per table, or ``trainer.export_bits`` for all when QAT was off."""
    return qat_bits(cfg, tables) or {t.name: cfg.trainer.export_bits for t in tables}


def build_converters(
    cfg: Config,
    *,
    tables: Sequence[TableConfig],
    device_type: str,
    export_bits_override: int | None = None,
) -> Converters:
    """The ordered converter list of ``cfg`` on ``device_type`` (see the module docstring).

    ``export_bits_override``: serve every table at these bits (offline export).
    """
    try:
        precision = resolve_precision(
            cfg.precision.name, device_type=device_type, fp16_on_cpu=cfg.precision.fp16_on_cpu
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    served = (
        {t.name: export_bits_override for t in tables}
        if export_bits_override
        else export_bits(cfg, tables)
    )
    converters: list[Converter] = [
        PrecisionConverter(
            precision, device_type=device_type, dense_optimizer=cfg.optim.dense_optimizer
        ),
        TableQAT(bits=qat_bits(cfg, tables), export_bits=served),
    ]
    if cfg.qat.dense_bits:
        converters.append(DenseQAT())
    if precision.loss_scaling:
        converters.append(LossScaling(init_scale=cfg.precision.loss_scale))
    return Converters(converters)
