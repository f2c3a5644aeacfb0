"""Validation of the compression settings: ``distill``, ``prune``, ``qat`` (with
``precision.tables``, the table storage QAT constrains).

Called by :func:`trainer.config.validate.validate`; every check raises
:class:`trainer.config.schema.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compression.precision import table_precision
from trainer.checkpoint.load import check_checkpoint
from trainer.config.checks import check, layer_sizes, positive
from trainer.config.schema import Config, ConfigError
from trainer.config.tables import qat_bits


def validate_distill(cfg: Config) -> None:
    d = cfg.distill
    if d.name == "none":
        return
    check(0 <= d.alpha <= 1, f"distill.alpha={d.alpha} must be in [0, 1] (1: labels only)")
    positive("distill.temperature", d.temperature)
    check(d.warmup_steps >= 0, f"distill.warmup_steps={d.warmup_steps} must be >= 0")
    for key, sizes in [
        ("distill.dense_arch_layer_sizes", d.dense_arch_layer_sizes),
        ("distill.over_arch_layer_sizes", d.over_arch_layer_sizes),
    ]:
        layer_sizes(key, sizes)
    check(
        len(d.over_arch_layer_sizes) >= 2 and d.over_arch_layer_sizes[-1] == 1,
        f"distill.over_arch_layer_sizes={list(d.over_arch_layer_sizes)} needs at least two "
        f"layers ending in 1 (one click logit); e.g. distill.over_arch_layer_sizes=[16,1]",
    )
    dim = cfg.model.embedding_dim if d.share_tables else d.embedding_dim
    positive("distill.embedding_dim", d.embedding_dim)
    where = "model.embedding_dim (share_tables)" if d.share_tables else "distill.embedding_dim"
    check(
        d.dense_arch_layer_sizes[-1] == dim,
        f"distill.dense_arch_layer_sizes[-1]={d.dense_arch_layer_sizes[-1]} must equal the "
        f"student's embedding dim {where}={dim} (the interaction stacks them); set them equal",
    )
    check(
        d.student_qat_bits in (0, 2, 4, 8),
        f"distill.student_qat_bits={d.student_qat_bits}: use 8, 4 or 2, or 0 for off",
    )
    check(
        not (d.share_tables and d.student_qat_bits),
        "distill.student_qat_bits with distill.share_tables=true: the student has no tables "
        "of its own; quantize the shared tables with qat.bits (or qat.table_bits)",
    )
    if d.teacher_checkpoint is not None:
        path = Path(d.teacher_checkpoint)
        check_checkpoint(path, key="distill.teacher_checkpoint")
    check(
        not d.freeze_teacher or d.teacher_checkpoint is not None,
        "distill.freeze_teacher=true without distill.teacher_checkpoint would keep an "
        "untrained teacher; give distill.teacher_checkpoint=.../checkpoints/step_N",
    )


def validate_prune(cfg: Config) -> None:
    p = cfg.prune
    check(p.row_min_norm >= 0, f"prune.row_min_norm={p.row_min_norm} must be >= 0 (0: off)")
    check(
        p.rows_by in ("norm", "access"),
        f"prune.rows_by={p.rows_by}: use norm (prune.row_min_norm) or access (prune.min_access)",
    )
    check(p.min_access >= 0, f"prune.min_access={p.min_access} must be >= 0 (0: off)")
    check(
        not (p.rows_by == "norm" and p.min_access > 0),
        f"prune.min_access={p.min_access} has no effect with prune.rows_by=norm; "
        "add prune.rows_by=access",
    )
    check(
        not (p.rows_by == "access" and p.row_min_norm > 0),
        f"prune.row_min_norm={p.row_min_norm} has no effect with prune.rows_by=access; "
        "use prune.min_access (or prune.rows_by=norm)",
    )
    check(
        0 <= p.dense_sparsity < 1,
        f"prune.dense_sparsity={p.dense_sparsity} must be in [0, 1) (0: off)",
    )
    if p.dense_sparsity:
        positive("prune.dense_every_steps", p.dense_every_steps)
        check(
            0 <= p.dense_start_step <= p.dense_end_step,
            f"prune.dense_start_step={p.dense_start_step} and dense_end_step="
            f"{p.dense_end_step}: need 0 <= start <= end",
        )


def validate_lowrank_dense(cfg: Config) -> None:
    d = cfg.lowrank_dense
    if d.mode == "none":
        return
    how = (("rank", d.rank), ("fraction", d.fraction), ("energy", d.energy), ("ranks", d.ranks))
    given = [k for k, v in how if v]
    check(
        len(given) == 1,
        f"lowrank_dense.mode={d.mode} needs exactly one of lowrank_dense.rank, "
        f"lowrank_dense.fraction, lowrank_dense.energy (> 0), lowrank_dense.ranks; "
        f"got {given or 'none'}",
    )
    num_linears = len(cfg.model.dense_arch_layer_sizes) + len(cfg.model.over_arch_layer_sizes)
    check(
        not d.ranks or (len(d.ranks) == num_linears and min(d.ranks) >= 0),
        f"lowrank_dense.ranks={list(d.ranks)}: give {num_linears} ranks >= 0, one per "
        "dense Linear (model.dense_arch_layer_sizes, then model.over_arch_layer_sizes; 0: dense)",
    )
    check(d.rank >= 0, f"lowrank_dense.rank={d.rank} must be >= 0 (0: not by rank)")
    check(0 <= d.fraction < 1, f"lowrank_dense.fraction={d.fraction} must be in [0, 1)")
    check(0 <= d.energy <= 1, f"lowrank_dense.energy={d.energy} must be in [0, 1]")
    check(
        not (d.energy and d.mode != "svd"),
        "lowrank_dense.energy keeps singular values of trained weights; add "
        "lowrank_dense.mode=svd (or give lowrank_dense.rank / fraction)",
    )
    check(
        d.allocate == "per_layer" or d.fraction > 0,
        "lowrank_dense.allocate=global spreads lowrank_dense.fraction over the layers; "
        "give lowrank_dense.fraction (not rank or energy)",
    )
    check(
        d.mode == "svd" or d.start_step == 0,
        f"lowrank_dense.start_step={d.start_step} has no effect with mode=from_start",
    )
    check(
        0 <= d.start_step < max(cfg.trainer.num_steps, 1),
        f"lowrank_dense.start_step={d.start_step} must be in [0, trainer.num_steps="
        f"{cfg.trainer.num_steps}): the step the SVD replaces the dense Linears",
    )
    check(
        cfg.model.arch in ("dlrm", "dlrm_dcnv2"),
        f"lowrank_dense with model.arch={cfg.model.arch}: only the DLRM dense/over MLPs "
        "are factorized; use model=dlrm or model=dlrm_dcnv2",
    )
    check(
        cfg.distill.name == "none",
        "lowrank_dense with distill=online is not supported yet; use one of them",
    )


def validate_budget(cfg: Config) -> None:
    b = cfg.budget
    if not b.ratio:
        return
    check(0 < b.ratio < 1, f"budget.ratio={b.ratio}: a share of the fp32 table bytes in (0, 1)")
    positive("budget.probe_steps", b.probe_steps)
    positive("budget.eval_batches", b.eval_batches)
    check(
        cfg.distill.name == "none",
        "budget.ratio with distill=online is not supported yet; use one of them",
    )


def validate_qat(cfg: Config, tables: Sequence[Any]) -> None:
    names = [t.name for t in tables]
    check(
        0 <= cfg.qat.start_step < max(cfg.trainer.num_steps, 1),
        f"qat.start_step={cfg.qat.start_step} must be in [0, trainer.num_steps="
        f"{cfg.trainer.num_steps}): the fp32 steps before table QAT starts",
    )
    for key, b in [("qat.bits", cfg.qat.bits)] + [
        (f"qat.table_bits.{n}", b) for n, b in cfg.qat.table_bits.items()
    ]:
        check(b in (0, 2, 4, 8), f"{key}={b}: use 8 or 4 (2 also works), or 0 for off")
    check(
        cfg.qat.small_table_bits in (2, 4, 8),
        f"qat.small_table_bits={cfg.qat.small_table_bits}: the bits of tables under "
        f"qat.small_table_rows; use 8, 4 or 2",
    )
    check(
        cfg.qat.small_table_rows >= 0,
        f"qat.small_table_rows={cfg.qat.small_table_rows}: a row count (0: off)",
    )
    for name in cfg.qat.table_bits:
        check(name in names, f"qat.table_bits.{name}: no such table")
    check(
        cfg.qat.dense_bits in (0, 8),
        f"qat.dense_bits={cfg.qat.dense_bits}: the dense layers train against int8 weights "
        f"only; use qat.dense_bits=8, or 0 for off",
    )
    # Table storage is checked here, beside the QAT it depends on; the student's QAT
    # (distill.student_qat_bits) quantizes tables too.
    student_qat = cfg.distill.name != "none" and bool(cfg.distill.student_qat_bits)
    quantized = bool(qat_bits(cfg.qat, tables)) or student_qat
    try:
        table_precision(str(cfg.precision.name), cfg.precision.tables, qat=quantized)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not quantized:
        return
    kernel = cfg.sharding.compute_kernel
    check(
        kernel != "fused_uvm_caching",
        "qat with sharding.compute_kernel=fused_uvm_caching: writes would miss the HBM "
        "cache; use sharding.compute_kernel=fused",
    )
