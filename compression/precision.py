"""Mixed precision: dense compute under autocast, tables stored in 16 bits.

``precision=fp32|bf16|fp16`` (the dense autocast dtype) and ``precision.tables``
(the table storage) resolve, per device, into a :class:`Precision`.
``precision.tables=auto`` (the default) stores tables as ``precision`` names
them -- except when table QAT quantizes any table (``qat.bits``,
``qat.table_bits``, ``distill.student_qat_bits``): then *every* table keeps
fp32 master rows, since 16-bit storage would round the fake-quantized rows
again and training would not see the served values. So ``precision=bf16``
alone is bf16 dense + 16-bit tables, and ``precision=bf16 qat=int4`` is bf16
dense autocast + fp32 master tables that QAT fake-quantizes. All tables, not
only the QAT'd ones: the model is built with one table dtype (``Converters.
table_data_type``). FBGEMM itself would allow a per-table choice -- an
EmbeddingBagCollection with fp32 and fp16 tables shards into one fused kernel
per dtype and trains on CPU (checked by hand, torchrec's table-wise plan) -- but
the model builders would need a dtype per table. An explicit 16-bit
``precision.tables`` with QAT is refused.

- dense layers run under ``torch.autocast``: bf16 anywhere; fp16 on CUDA, with a
  dynamic loss scale (``loss_scaling``). The fused table optimizer runs *inside*
  backward, before any ``GradScaler.step`` could skip it, so
  compression/grad_scale.py unscales the tables' gradient at the sparse arch's
  output and zeroes it on overflow (a zero gradient leaves FBGEMM's row-wise
  Adagrad row and state unchanged). On CPU, fp16 dense compute falls back to bf16
  (with a warning) unless ``fp16_on_cpu`` asks for the CUDA path, which is how
  the tests exercise it (it has not yet been run on a GPU);
- table weights are stored in fp16 or bf16 inside FBGEMM's fused kernel, which
  rounds the fused optimizer's updates stochastically (``stochastic_rounding``)
  so small updates are not lost. FBGEMM's CPU kernel has no bf16 tables, so on
  CPU bf16 tables fall back to fp16 with a warning.

The converter is applied before sharding (tables on ``meta`` take the dtype);
the autocast forward is handed to the train pipeline.

Example::

    p = resolve_precision("bf16", device_type="cpu", qat=True)  # bf16 dense, fp32 tables
    tables = [dataclasses.replace(t, data_type=p.table_data_type) for t in tables]
    pipeline = make_pipeline(..., model_fwd=autocast_forward(model, p, device_type="cpu"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType

from compression.converter import Converter, Forward
from compression.names import PRECISIONS

log = logging.getLogger(__name__)

# precision.tables: "auto" follows precision.name, but keeps fp32 when QAT is on.
TABLE_PRECISIONS = ("auto", *PRECISIONS)
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_TABLE_TYPES = {"fp32": DataType.FP32, "bf16": DataType.BF16, "fp16": DataType.FP16}


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None
    table_data_type: DataType
    # fp16 autocast: scale the loss (compression/grad_scale.py) so gradients do not underflow.
    loss_scaling: bool = False

    @property
    def fused_params(self) -> dict[str, Any]:
        """Extra FBGEMM kernel arguments for 16-bit tables."""
        if self.table_data_type == DataType.FP32:
            return {}
        return {"stochastic_rounding": True}

    @property
    def tables(self) -> str:
        """The table storage as a precision name (``fp32``, ``fp16``, ``bf16``)."""
        return {v: k for k, v in _TABLE_TYPES.items()}[self.table_data_type]


def table_precision(name: str, tables: str = "auto", *, qat: bool = False) -> str:
    """``precision.tables`` resolved (before any device fallback); raises ValueError
    for an unknown value, or 16-bit tables asked for explicitly together with QAT."""
    if tables not in TABLE_PRECISIONS:
        raise ValueError(
            f"precision.tables={tables!r} is not known; use one of {', '.join(TABLE_PRECISIONS)}"
        )
    if tables == "auto":
        # QAT's fake-quantized rows must reach the kernel unrounded: fp32 master rows.
        return "fp32" if qat else name
    if qat and tables != "fp32":
        raise ValueError(
            f"precision.tables={tables} with table QAT: 16-bit tables would round the "
            f"fake-quantized rows again, so training would not see the served values; "
            f"use precision.tables=auto (or fp32): QAT tables keep fp32 master rows while "
            f"precision={name} still sets the dense autocast"
        )
    return tables


def resolve_precision(
    name: str,
    *,
    device_type: str,
    fp16_on_cpu: bool = False,
    tables: str = "auto",
    qat: bool = False,
) -> Precision:
    """What ``name`` (dense) and ``tables`` (storage) mean on this device, warning
    where a fallback applies.

    ``fp16_on_cpu`` runs fp16 on CPU as on CUDA (fp16 autocast and loss scaling)
    instead of falling back to bf16 dense compute: slow, but the same numerics.
    ``qat``: some table is fake-quantized, so ``tables="auto"`` means fp32.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not known; use one of {', '.join(PRECISIONS)}")
    dense, stored = name, table_precision(name, tables, qat=qat)
    if name == "fp16" and device_type != "cuda" and not fp16_on_cpu:
        log.warning(
            "precision=fp16: dense layers run bf16 autocast on CPU (pass "
            "precision.fp16_on_cpu=true for fp16 with loss scaling, as on CUDA); tables "
            "are stored in %s",
            stored,
        )
        dense = "bf16"
    if device_type == "cpu" and stored == "bf16":
        log.warning(
            "precision=%s: FBGEMM's CPU kernel has no bf16 tables; storing them in fp16 "
            "(dense layers run %s)",
            name,
            dense,
        )
        stored = "fp16"
    return Precision(
        name=name,
        autocast_dtype=_DTYPES[dense],
        table_data_type=_TABLE_TYPES[stored],
        loss_scaling=dense == "fp16",
    )


def autocast_forward(
    model: Callable[[Any], Any], precision: Precision, *, device_type: str
) -> Callable[[Any], Any] | None:
    """The forward the train pipeline calls: ``model(batch)`` under autocast (None: no autocast)."""
    if precision.autocast_dtype is None:
        return None

    def forward(batch: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=precision.autocast_dtype):
            return model(batch)

    return forward


class PrecisionConverter(Converter):
    name = "precision"

    def __init__(self, precision: Precision, *, device_type: str, dense_optimizer: str) -> None:
        self.precision = precision
        self.device_type = device_type
        self.dense_optimizer = dense_optimizer

    def table_data_type(self) -> DataType | None:
        return self.precision.table_data_type

    def fused_params(self) -> dict[str, Any]:
        return self.precision.fused_params

    def check_plan(self, plan: ShardingPlan) -> None:
        """Data-parallel tables are dense parameters: the dense optimizer updates them in 16 bits.

        Adam's (and Adagrad's) state then lives in fp16/bf16, its eps rounds to 0 and
        the rows turn nan within a few steps (measured on CPU); the fused kernels keep
        their optimizer state in fp32 and round stochastically, the dense path does not.
        Plain SGD has no such state and is allowed.
        """
        if self.precision.table_data_type == DataType.FP32 or self.dense_optimizer == "sgd":
            return
        data_parallel = sorted(
            table
            for module_plan in plan.plan.values()
            for table, ps in module_plan.items()  # type: ignore[union-attr]
            if ps.sharding_type == "data_parallel"
        )
        if data_parallel:
            raise ValueError(
                f"precision.tables={self.precision.tables} stores tables in 16 bits, but tables "
                f"{data_parallel} are data_parallel, updated by the dense optimizer without "
                f"stochastic rounding with optim.dense_optimizer={self.dense_optimizer} (they "
                f"diverge to nan); shard them (e.g. sharding=table_wise, or "
                f"'+sharding.tables={{{data_parallel[0]}:{{strategy:table_wise}}}}') "
                f"or use precision.tables=fp32 (dense autocast stays precision="
                f"{self.precision.name})"
            )

    def wrap_forward(self, forward: Forward) -> Forward:
        return autocast_forward(forward, self.precision, device_type=self.device_type) or forward

    def summary(self) -> dict[str, Any]:
        return {"precision": self.precision.name, "table_precision": self.precision.tables}

    def export_summary(self) -> dict[str, Any]:
        # The served dense layers run fp32 whatever the training autocast was
        # (trainer/export/step.py: the parity check compares against fp32 dense).
        dtype = self.precision.autocast_dtype
        trained = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        return {"dense_dtype": "fp32", "train_autocast": trained}
