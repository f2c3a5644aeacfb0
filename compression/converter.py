"""Compression as converters: one class per technique, applied as an ordered list.

A run's compression (precision, table QAT, dense QAT, loss scaling; distillation
and pruning next) is a list of :class:`Converter`\\ s built once from config
(``trainer/builder/compression.py`` writes the order down, with the reason). Each
converter acts only at the moments it overrides; every default does nothing.
The trainer, the pipeline, the checkpoint and the export ask the list
(:class:`Converters`), never a particular technique.

The moments, in the order a run meets them::

    table_data_type / fused_params   while the meta model and the sharders are built
    wrap_model(model)                the unsharded model (meta, before planning; cpu at export)
    check_plan(plan)                 once the plan exists (refuse what cannot train)
    convert_sharded(model)           after DistributedModelParallel (hooks on kernels)
    wrap_optimizer(model, opt)       around the combined optimizer
    wrap_forward(fwd)                the forward the train pipeline calls
    state_dict / load_state_dict     checkpoint state (tensors only; DCP Stateful)
    prepare_trained(model)           an unsharded model that loads the trained state
    as_trained_eval(model)           ... made to compute what training's eval computed
    to_serving(model)                the model that is served (export)
    summary() / export_summary()     what goes into summary.json (and its "export")

Example::

    converters = Converters([Precision16(...), TableQAT(bits={"t_cat_0": 4}), ...])
    converters.convert_sharded(dmp, device=device, process_group=pg)
    optimizer = converters.wrap_optimizer(dmp, optimizer, device=device, process_group=pg)
    pipeline = make_pipeline(..., model_fwd=converters.wrap_forward(dmp))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType

Forward = Callable[[Any], Any]


class Converter:
    """One compression technique; subclasses override only the moments they act at."""

    name = "converter"

    def table_data_type(self) -> DataType | None:
        """The dtype tables are stored in, or None to leave it to others (fp32)."""
        return None

    def fused_params(self) -> dict[str, Any]:
        """Extra arguments for the fused FBGEMM kernels (the sharders)."""
        return {}

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The unsharded model as built from config (on ``meta`` before planning, so
        what this returns is what gets planned and sharded; on cpu for the export)."""
        return model

    def check_plan(self, plan: ShardingPlan) -> None:
        """Raises ValueError when the plan cannot train with this technique."""

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        """In place, on every rank, after sharding."""

    def wrap_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        process_group: Any,
    ) -> torch.optim.Optimizer:
        return optimizer

    def wrap_forward(self, forward: Forward) -> Forward:
        """``forward(batch) -> (loss, output)`` as the train pipeline will call it."""
        return forward

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (checkpointed through DCP). Called on every rank together: a
        converter may reduce across ranks here (row pruning sums its access counts)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def prepare_trained(self, model: nn.Module) -> None:
        """In place: an unsharded model (fp32, cpu) that the trained state dict loads into."""

    def as_trained_eval(self, model: nn.Module) -> None:
        """In place: the loaded model now computes what training's eval forward computed."""

    def to_serving(self, model: nn.Module) -> nn.Module:
        return model

    def summary(self) -> dict[str, Any]:
        return {}

    def export_summary(self) -> dict[str, Any]:
        return {}


class Converters:
    """The ordered list; each method folds over it (serving in reverse, see below)."""

    def __init__(self, converters: Sequence[Converter]) -> None:
        names = [c.name for c in converters]
        if len(set(names)) != len(names):
            raise ValueError(f"converter names must be unique, got {names}")
        self.converters = list(converters)

    def __iter__(self) -> Iterator[Converter]:
        return iter(self.converters)

    def table_data_type(self) -> DataType:
        chosen = [c.table_data_type() for c in self.converters]
        return next((t for t in chosen if t is not None), DataType.FP32)

    def fused_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for c in self.converters:
            params.update(c.fused_params())
        return params

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for c in self.converters:
            model = c.wrap_model(model)
        return model

    def check_plan(self, plan: ShardingPlan) -> None:
        for c in self.converters:
            c.check_plan(plan)

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        for c in self.converters:
            c.convert_sharded(model, device=device, process_group=process_group)

    def wrap_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        process_group: Any,
    ) -> torch.optim.Optimizer:
        for c in self.converters:
            optimizer = c.wrap_optimizer(
                model, optimizer, device=device, process_group=process_group
            )
        return optimizer

    def wrap_forward(self, model: nn.Module) -> Forward | None:
        """The pipeline's forward: ``model`` wrapped by each converter in order, or
        None when no converter changes it (the pipeline then calls ``model``)."""
        forward: Forward = model
        for c in self.converters:
            forward = c.wrap_forward(forward)
        return None if forward is model else forward

    # DCP Stateful: one entry per converter that has state.
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {c.name: s for c in self.converters if (s := c.state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for c in self.converters:
            if c.name in state:
                c.load_state_dict(state[c.name])

    def prepare_trained(self, model: nn.Module) -> None:
        for c in self.converters:
            c.prepare_trained(model)

    def as_trained_eval(self, model: nn.Module) -> None:
        for c in self.converters:
            c.as_trained_eval(model)

    def to_serving(self, model: nn.Module) -> nn.Module:
        # Reverse order: the last technique applied in training is undone first
        # (dense int8 Linears are swapped on a plain copy, then the tables quantized).
        for c in reversed(self.converters):
            model = c.to_serving(model)
        return model

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.converters:
            out.update(c.summary())
        return out

    def export_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dense_bits": 0}
        for c in self.converters:
            out.update(c.export_summary())
        return out
