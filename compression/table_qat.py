"""The table QAT converter: fake-quantized rows in the sharded kernels, quantized export.

During training it hooks the sharded FBGEMM kernels (compression/qat_kernels.py)
so every lookup returns the rows the served int8/int4/int2 model returns; at
export it quantizes the tables (the QAT bits, or post-training bits when QAT is
off) through compression/serving.py.

Example::

    converters = Converters([TableQAT(bits={"t_cat_0": 4}, export_bits={"t_cat_0": 4})])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression.converter import Converter, Forward
from compression.qat_kernels import QATHandle, enable_embedding_qat
from compression.serving import fake_quantize_tables, quantize_for_serving


class TableQAT(Converter):
    """``bits``: the QAT tables (may be empty); ``export_bits``: every table's serving bits.

    ``start_step``: fp32 training steps before the fake quantization starts (QAT
    fine-tunes a warmed-up model); the step count is checkpoint state.
    ``row_range``: each row's range in QAT and in the export, ``"minmax"`` or
    ``"mse"`` (compression/row_range.py; also for post-training export);
    ``export_row_range``: another range for the export only (re-exporting a run).
    """

    name = "table_qat"

    def __init__(
        self,
        *,
        bits: dict[str, int],
        export_bits: dict[str, int],
        start_step: int = 0,
        row_range: str = "minmax",
        export_row_range: str | None = None,
    ) -> None:
        self.bits = dict(bits)
        self.export_bits = dict(export_bits)
        self.start_step = start_step
        self.row_range = row_range
        self.export_row_range = export_row_range or row_range
        self.step = 0
        self.model: nn.Module | None = None
        self.handle: QATHandle | None = None

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        # Hooks the sharded kernels, so it comes after sharding.
        self.model = model
        if self.bits and self.start_step == 0:
            self.handle = enable_embedding_qat(model, bits=self.bits, row_range=self.row_range)

    def wrap_forward(self, forward: Forward) -> Forward:
        if not self.bits or self.start_step == 0:
            return forward

        def warmed_up(batch: Any) -> Any:
            assert self.model is not None, "convert_sharded comes first"
            training = self.model.training
            if training and self.handle is None and self.step >= self.start_step:
                # Every rank counts the same steps, so all hook (and build the
                # column-slice groups) at the same step. An eval before it is fp32.
                self.handle = enable_embedding_qat(
                    self.model, bits=self.bits, row_range=self.row_range
                )
            out = forward(batch)
            if training:
                self.step += 1
            return out

        return warmed_up

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step)} if self.bits and self.start_step else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "step" in state:
            self.step = int(state["step"])

    def as_trained_eval(self, model: nn.Module) -> None:
        fake_quantize_tables(model, table_bits=self.bits, row_range=self.row_range)

    def to_serving(self, model: nn.Module) -> nn.Module:
        return quantize_for_serving(
            model, table_bits=self.export_bits, row_range=self.export_row_range
        )

    def summary(self) -> dict[str, Any]:
        return {"qat_bits": max(self.bits.values(), default=0), "row_range": self.row_range}

    def export_summary(self) -> dict[str, Any]:
        return {"bits": self.export_bits, "row_range": self.export_row_range}
