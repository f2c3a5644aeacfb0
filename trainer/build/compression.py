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

5. **distillation** (``distill=online``) -- ``wrap_model`` pairs the meta
   teacher with its student before planning, so one plan shards both models'
   tables (the position in the list does not change that: ``wrap_model`` is
   the only moment before planning that builds modules); its forward wrapper
   only switches the soft term on after the warm-up and counts steps (both
   losses are the pair's own forward, so autocast and the loss scale apply to
   teacher and student alike). Table QAT covers the student's tables by name
   (``s_t_cat_0``: ``qat.bits``, ``qat.table_bits``, ``distill.student_qat_bits``),
   and the served model is the student (``DistillTrain.model``), so the export
   bits name the student's tables;
6. **pruning** -- dense magnitude pruning on a schedule (forward wrapper, after
   distillation counts its step) and embedding row pruning at export: last in
   the list, so first in ``to_serving``'s reverse order, on fp32 rows before
   they are quantized.

Nothing else in the trainer names a technique.

Example::

    converters = build_converters(cfg, tables=tables, device_type="cpu")
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from compression.converter import Converter, Converters
from compression.dense_qat import DenseQAT
from compression.grad_scale import LossScaling
from compression.precision import PrecisionConverter
from compression.table_qat import TableQAT
from compression.distill import DistillConverter
from compression.precision import resolve_precision
from compression.prune import prune_converters
from trainer.config.schema import Config, ConfigError, TableConfig, qat_bits, uniform_bits
from trainer.models.distill import make_pair, student_tables


def model_tables(cfg: Config, tables: Sequence[TableConfig]) -> list[TableConfig]:
    """Every table the trained model holds: ``tables`` (the model's), plus the
    distillation student's own tables (``s_<name>``) with ``distill=online``."""
    d = cfg.distill
    if d.name == "none" or d.share_tables:
        return list(tables)
    return list(tables) + student_tables(tables, embedding_dim=d.embedding_dim)


def served_tables(cfg: Config, tables: Sequence[TableConfig]) -> list[TableConfig]:
    """The tables of the model that is exported (the student's when distilling)."""
    return [t for t in model_tables(cfg, tables) if t not in tables] or list(tables)


def trained_qat_bits(cfg: Config, tables: Sequence[TableConfig]) -> dict[str, int]:
    """QAT bits of every table of the trained model (``distill.student_qat_bits`` too)."""
    everything = model_tables(cfg, tables)
    bits = qat_bits(cfg, everything)
    if cfg.distill.name != "none" and cfg.distill.student_qat_bits:
        bits.update(uniform_bits(cfg, served_tables(cfg, tables), cfg.distill.student_qat_bits))
    return bits


def export_bits(cfg: Config, tables: Sequence[TableConfig]) -> dict[str, int]:
    """The QAT bits per served table, or ``trainer.export_bits`` for all when QAT was off."""
    served = served_tables(cfg, tables)
    bits = trained_qat_bits(cfg, tables)
    qat = {t.name: bits[t.name] for t in served if t.name in bits}
    return qat or uniform_bits(cfg, served, cfg.trainer.export_bits)


def build_converters(
    cfg: Config,
    *,
    tables: Sequence[TableConfig],
    device_type: str,
    export_bits_override: int | None = None,
    export_range_override: str | None = None,
) -> Converters:
    """The ordered converter list of ``cfg`` on ``device_type`` (see the module docstring).

    ``export_bits_override``: serve every table at these bits (offline export);
    ``export_range_override``: with this row range (``minmax`` | ``mse``).
    """
    try:
        # With precision.tables=auto, any QAT table keeps every table fp32 master rows
        # (compression/precision.py); the autocast dtype is precision.name's either way.
        precision = resolve_precision(
            cfg.precision.name,
            device_type=device_type,
            fp16_on_cpu=cfg.precision.fp16_on_cpu,
            tables=cfg.precision.tables,
            qat=bool(trained_qat_bits(cfg, tables)),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    served = (
        uniform_bits(cfg, served_tables(cfg, tables), export_bits_override)
        if export_bits_override
        else export_bits(cfg, tables)
    )
    converters: list[Converter] = [
        PrecisionConverter(
            precision, device_type=device_type, dense_optimizer=cfg.optim.dense_optimizer
        ),
        TableQAT(
            bits=trained_qat_bits(cfg, tables),
            export_bits=served,
            start_step=cfg.qat.start_step,
            row_range=str(cfg.qat.range),
            export_row_range=export_range_override,
        ),
    ]
    if cfg.qat.dense_bits:
        converters.append(DenseQAT())
    if precision.loss_scaling:
        converters.append(LossScaling(init_scale=cfg.precision.loss_scale))
    if cfg.distill.name != "none":
        converters.append(_distill_converter(cfg, tables))
    p = cfg.prune
    converters += prune_converters(
        row_min_norm=p.row_min_norm,
        dense_sparsity=p.dense_sparsity,
        dense_start_step=p.dense_start_step,
        dense_end_step=p.dense_end_step,
        dense_every_steps=p.dense_every_steps,
        rows_by=p.rows_by,
        min_access=p.min_access,
        # Counted per feature of the trained model's tables (the served ones read the same).
        feature_rows={f: t.num_embeddings for t in tables for f in t.feature_names},
    )
    return Converters(converters)


def _distill_converter(cfg: Config, tables: Sequence[TableConfig]) -> DistillConverter:
    d = cfg.distill
    return DistillConverter(
        make_pair=functools.partial(make_pair, tables=list(tables), distill=d, model=cfg.model),
        warmup_steps=d.warmup_steps,
        teacher_checkpoint=d.teacher_checkpoint,
        settings={
            "alpha": d.alpha,
            "temperature": d.temperature,
            "share_tables": d.share_tables,
            "student_embedding_dim": d.embedding_dim,
            "freeze_teacher": d.freeze_teacher,
        },
    )
