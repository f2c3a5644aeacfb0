"""The converters of today's techniques (see compression/converter.py for the moments).

- :class:`PrecisionConverter`: 16-bit tables with stochastic rounding, dense
  layers under autocast; refuses 16-bit data-parallel tables under a stateful
  dense optimizer.
- :class:`TableQAT`: fake-quantized table rows in the sharded kernels; the
  export quantizes the tables (QAT bits, or post-training bits when QAT is off).
- :class:`DenseQAT`: int8 weight fake-quant of the dense Linears; served as
  ``Int8WeightOnlyLinear``.
- :class:`LossScaling`: fp16 loss scale honoured by the in-backward table optimizer.

Example::

    converters = Converters([PrecisionConverter(p, dense_optimizer="adam"),
                             TableQAT(bits={"t_cat_0": 4}, export_bits={"t_cat_0": 4})])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType

from compression.converter import Converter, Forward
from compression.dense_qat import enable_dense_qat, quantize_dense_for_serving
from compression.grad_scale import LossScale, enable_loss_scaling
from compression.precision import Precision, autocast_forward
from compression.qat import QATHandle, enable_embedding_qat
from compression.serving import fake_quantize_tables, quantize_for_serving


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
                f"precision={self.precision.name} stores tables in 16 bits, but tables "
                f"{data_parallel} are data_parallel, updated by the dense optimizer without "
                f"stochastic rounding with optim.dense_optimizer={self.dense_optimizer} (they "
                f"diverge to nan); shard them (e.g. sharding=table_wise, or "
                f"'+sharding.tables={{{data_parallel[0]}:{{strategy:table_wise}}}}') "
                f"or use precision=fp32"
            )

    def wrap_forward(self, forward: Forward) -> Forward:
        return autocast_forward(forward, self.precision, device_type=self.device_type) or forward

    def summary(self) -> dict[str, Any]:
        return {"precision": self.precision.name}


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


class DenseQAT(Converter):
    name = "dense_qat"

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        # Parametrizes the Linears DDP already holds (the same Parameters, so DDP's
        # gradient hooks still fire); not on the meta model: torch's fake
        # quantization has no meta kernel, and DMP's reset_parameters would
        # initialize the computed weight instead of the master.
        enable_dense_qat(model)

    def prepare_trained(self, model: nn.Module) -> None:
        # The trained state names each weight ``parametrizations.weight.original``.
        enable_dense_qat(model)

    def to_serving(self, model: nn.Module) -> nn.Module:
        return quantize_dense_for_serving(model)

    def summary(self) -> dict[str, Any]:
        return {"dense_bits": 8}

    def export_summary(self) -> dict[str, Any]:
        return {"dense_bits": 8}


class LossScaling(Converter):
    """fp16: the pipeline backpropagates the scaled loss; the optimizer unscales."""

    name = "loss_scaling"

    def __init__(self, *, init_scale: float) -> None:
        self.init_scale = init_scale
        self.loss_scale: LossScale | None = None

    def wrap_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        process_group: Any,
    ) -> torch.optim.Optimizer:
        scaled = enable_loss_scaling(
            model,
            optimizer,  # type: ignore[arg-type]
            device=device,
            init_scale=self.init_scale,
            process_group=process_group,
        )
        self.loss_scale = scaled.loss_scale
        return scaled

    def wrap_forward(self, forward: Forward) -> Forward:
        assert self.loss_scale is not None, "wrap_optimizer comes first"
        return self.loss_scale.forward(forward)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.loss_scale is not None
        scaler = self.loss_scale.scaler.state_dict()
        return {
            "scale_and_tracker": torch.tensor(
                [scaler["scale"], scaler["_growth_tracker"]], dtype=torch.float64
            )
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.loss_scale is None:  # an offline export: nothing trains, nothing to scale
            return
        scaler = self.loss_scale.scaler
        scale, tracker = state["scale_and_tracker"].tolist()
        scaler.load_state_dict(
            {**scaler.state_dict(), "scale": scale, "_growth_tracker": int(tracker)}
        )
