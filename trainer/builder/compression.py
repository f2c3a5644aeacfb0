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
3b. **low-rank dense** (``lowrank_dense.mode``) -- ``wrap_model`` factorizes the
   meta model's MLP Linears before planning (the factors are nn.Linears, so dense
   QAT covers them); after dense QAT in the list, so first in ``to_serving``:
   the kept factors are cut out before dense QAT quantizes them;
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

    tables = run_tables(cfg, features=source.features)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from compression.converter import Converter, Converters
from compression.dense_qat import DenseQAT
from compression.distill import DistillConverter
from compression.grad_scale import LossScaling
from compression.lowrank_dense import LowRankDense
from compression.precision import PrecisionConverter, resolve_precision
from compression.prune import prune_converters
from compression.table_qat import TableQAT
from trainer.checkpoint.safe_reader import SafeReader
from trainer.config.schema import Config, ConfigError, TableConfig
from trainer.config.tables import RunTables
from trainer.models.distill import make_pair


def build_converters(
    cfg: Config,
    *,
    tables: RunTables,
    device_type: str,
    export_range_override: str | None = None,
) -> Converters:
    """The ordered converter list of ``cfg`` on ``device_type`` (see the module docstring).

    ``tables``: the run's (their QAT and export bits included);
    ``export_range_override``: serve with this row range (``minmax`` | ``mse``).
    """
    try:
        # With precision.tables=auto, any QAT table keeps every table fp32 master rows
        # (compression/precision.py); the autocast dtype is precision.name's either way.
        precision = resolve_precision(
            cfg.precision.name,
            device_type=device_type,
            fp16_on_cpu=cfg.precision.fp16_on_cpu,
            tables=cfg.precision.tables,
            qat=bool(tables.qat_bits),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    converters: list[Converter] = [
        PrecisionConverter(
            precision, device_type=device_type, dense_optimizer=cfg.optim.dense_optimizer
        ),
        TableQAT(
            bits=tables.qat_bits,
            export_bits=tables.export_bits,
            start_step=cfg.qat.start_step,
            row_range=str(cfg.qat.range),
            export_row_range=export_range_override,
        ),
    ]
    if cfg.qat.dense_bits:
        converters.append(DenseQAT())
    if cfg.lowrank_dense.mode != "none":
        converters.append(lowrank_dense(cfg))
    if precision.loss_scaling:
        converters.append(LossScaling(init_scale=cfg.precision.loss_scale))
    if cfg.distill.name != "none":
        converters.append(_distill_converter(cfg, tables.model))
    p = cfg.prune
    converters += prune_converters(
        row_min_norm=p.row_min_norm,
        dense_sparsity=p.dense_sparsity,
        dense_start_step=p.dense_start_step,
        dense_end_step=p.dense_end_step,
        dense_every_steps=p.dense_every_steps,
        rows_by=p.rows_by,
        min_access=p.min_access,
        # Counted per feature of the model's tables (the served ones read the same).
        feature_rows=tables.feature_rows(),
    )
    return Converters(converters)


def _distill_converter(cfg: Config, tables: Sequence[TableConfig]) -> DistillConverter:
    d = cfg.distill
    return DistillConverter(
        make_pair=functools.partial(make_pair, tables=list(tables), distill=d, model=cfg.model),
        warmup_steps=d.warmup_steps,
        teacher_checkpoint=d.teacher_checkpoint,
        teacher_reader=SafeReader,  # never unpickles the teacher's .metadata
        settings={
            "alpha": d.alpha,
            "temperature": d.temperature,
            "share_tables": d.share_tables,
            "student_embedding_dim": d.embedding_dim,
            "freeze_teacher": d.freeze_teacher,
        },
    )


def lowrank_dense(cfg: Config) -> LowRankDense:
    """The low-rank dense converter ``lowrank_dense.*`` describes."""
    d = cfg.lowrank_dense
    return LowRankDense(
        mode=str(d.mode),
        rank=d.rank,
        fraction=d.fraction,
        energy=d.energy,
        start_step=d.start_step,
        allocate=str(d.allocate),
        ranks=tuple(d.ranks),
    )
