"""The compression groups of the schema (trainer/config/schema.py's ``Config``):
``precision``, ``qat``, ``prune``, ``lowrank_dense`` and ``budget``."""

from __future__ import annotations

from dataclasses import dataclass, field

from compression.names import (
    LOWRANK_DENSE_ALLOCATIONS,
    LOWRANK_DENSE_MODES,
    PRECISIONS,
    RANGES,
)
from trainer.config.choices import choices

PrecisionName = choices("PrecisionName", PRECISIONS)
RowRange = choices("RowRange", RANGES)
LowRankDenseMode = choices("LowRankDenseMode", LOWRANK_DENSE_MODES)
LowRankDenseAllocate = choices("LowRankDenseAllocate", LOWRANK_DENSE_ALLOCATIONS)


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp16: dense autocast dtype, and table storage unless `tables` says
    # otherwise (compression/precision.py).
    name: PrecisionName = PrecisionName.fp32
    # auto | fp32 | fp16 | bf16: table storage. auto: as `name`, but fp32 master rows when
    # table QAT is on (QAT's fake-quantized rows must not be rounded to 16 bits again).
    # A plain str, checked in validate_qat (compression.precision.TABLE_PRECISIONS).
    tables: str = "auto"
    # fp16 only: initial loss scale; dynamic (halved on overflow, doubled after 2000 clean steps).
    loss_scale: float = 65536.0
    # fp16 on CPU runs dense layers in bf16 unless this is true (fp16 + loss scaling, as on CUDA).
    fp16_on_cpu: bool = False


@dataclass
class QATConfig:
    # 0: off; 8, 4 (or 2): every table trains on the rows int8/int4 serving will see.
    bits: int = 0
    # Per table, overriding bits (0 keeps that table in fp32).
    table_bits: dict[str, int] = field(default_factory=dict)
    # 0: off; 8: the dense MLPs' Linear weights train on their int8 per-channel values.
    dense_bits: int = 0
    # Table QAT starts after this many fp32 steps (0: from the first step).
    start_step: int = 0
    # Each quantized row's range, in QAT and in the export (post-training too):
    # minmax (FBGEMM's) | mse (fitted to the row's rounding error; compression/row_range.py).
    range: RowRange = RowRange.minmax
    # Tables with fewer rows than this take small_table_bits instead of the bits
    # every table gets (qat.bits, trainer.export_bits, distill.student_qat_bits,
    # `trainer.export --bits`); table_bits still wins. 0: off. Small tables are
    # looked up by almost every sample and cost almost nothing to keep wider.
    small_table_rows: int = 0
    small_table_bits: int = 8


@dataclass
class PruneConfig:
    """Pruning (compression/prune.py); every field's zero turns its part off."""

    # At export, rows go to one shared default row by rows_by: "norm" (L2 norm below
    # row_min_norm) or "access" (looked up fewer than min_access times in training).
    rows_by: str = "norm"
    row_min_norm: float = 0.0
    min_access: int = 0
    # Dense: magnitude pruning (L1, per Linear) of the MLP weights to this sparsity,
    # raised in equal steps every dense_every_steps from dense_start_step to dense_end_step.
    dense_sparsity: float = 0.0
    dense_start_step: int = 0
    dense_end_step: int = 0
    dense_every_steps: int = 100


@dataclass
class LowRankDenseConfig:
    """Low-rank dense layers (compression/lowrank_dense.py): the dense and over MLP
    Linears as ``U V``; not the tables, not DCNv2's cross layers (model.dcn_low_rank_dim)."""

    # none | from_start (factors trained from a random init) | svd (each trained Linear
    # replaced by its truncated SVD at start_step, then fine-tuned).
    mode: LowRankDenseMode = LowRankDenseMode.none
    # How much each Linear keeps, one of: rank (capped per layer), fraction (of each
    # layer's weights: 0.25 keeps about a quarter), energy (svd only: the share of the
    # squared singular values kept, per layer).
    rank: int = 0
    fraction: float = 0.0
    energy: float = 0.0
    start_step: int = 0
    # How fraction is spent: per_layer (each layer its share) | global (one budget over
    # all the layers, where the spectra keep the most; compression/lowrank_allocate.py).
    allocate: LowRankDenseAllocate = LowRankDenseAllocate.per_layer
    # Or one rank per dense Linear in model order (bottom MLP, then top MLP with the
    # logit layer; 0: stays dense), e.g. [0,0,9,8,0] on the default DLRM.
    ranks: list[int] = field(default_factory=list)


@dataclass
class BudgetConfig:
    """The size budget (trainer/builder/budget.py, compression/budget.py): each table's
    bits, rank or QR split chosen from measured sensitivity to fit the budget."""

    # Served table bytes as a share of the fp32 table bytes (0.05: 1/20); 0: off.
    ratio: float = 0.0
    # The in-process probe run that the sensitivity is measured on, and its eval batches.
    probe_steps: int = 300
    eval_batches: int = 2
    # Tables with fewer rows are only offered int8 / int4 / int2 (no rank, no QR).
    min_rows: int = 1000
