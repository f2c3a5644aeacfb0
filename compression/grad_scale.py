"""fp16 loss scaling that the tables' in-backward optimizer honours.

fp16 dense compute needs a loss scale S, or small gradients underflow. torch's
``GradScaler`` multiplies the loss by S and, at ``optimizer.step()``, divides the
gradients by S and skips the step if any is inf/nan. The tables have no such
"at step": FBGEMM's fused row-wise Adagrad updates a row inside backward, the
moment its gradient arrives. So the tables' gradient is unscaled on its way in,
at a boundary between the sparse arch (embedding lookups) and the dense part::

    loss * S --backward--> over arch, interaction, bottom MLP: scaled gradients
                           |
        table boundary     |  grad / S, or all zeros if any element is inf/nan
        (SparseArch out)   |  on any rank (an all-reduce; found_inf recorded)
                           v
        output all-to-all -> fused row-wise Adagrad: a zero gradient leaves the
                             row and its momentum unchanged -- the step is skipped

At ``optimizer.step()`` the boundary's flag joins the dense gradients as one more
"gradient" that ``GradScaler.unscale_`` checks, so GradScaler's own ``step`` skips
the dense update and ``update`` backs the scale off when either side overflowed,
and grows it after ``growth_interval`` clean steps. Parameters under the sparse
arch that the dense optimizer owns (data-parallel tables) get their gradient
through the boundary, already unscaled, so GradScaler does not unscale them again.

The loss the pipeline backpropagates is the scaled one; the model's output (and
so every logged loss) is not.

Example::

    optimizer = enable_loss_scaling(dmp, optimizer, device=device, process_group=pg)
    fwd = optimizer.loss_scale.forward(autocast_forward(dmp, precision, device_type="cuda"))
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, custom_model_fwd=fwd)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.models.dlrm import SparseArch
from torchrec.optim.keyed import CombinedOptimizer

from compression.converter import Converter, Forward
from sharding.collectives import any_rank


class LossScale:
    """torch's ``GradScaler`` plus the table boundary's overflow flag for one model."""

    def __init__(
        self,
        *,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=init_scale, growth_interval=growth_interval
        )
        self.process_group = process_group
        # Set (on device, no host sync) by the boundary in backward; cleared each step.
        self.found_inf = torch.zeros((), device=device)
        self._inv_scale: torch.Tensor | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S``, remembering ``1 / S`` for the table boundary's backward."""
        # scale(1) reads the current S as a tensor through the public API, without a
        # host sync; the reciprocal is taken in fp64 as GradScaler.unscale_ does, so
        # tables and dense layers divide by exactly the same number.
        scale = self.scaler.scale(torch.ones((), device=loss.device))
        self._inv_scale = scale.double().reciprocal().float()
        return self.scaler.scale(loss)

    def forward(self, model_fwd: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``model_fwd`` (returning ``(loss, output)``) with the loss scaled, output as is."""

        def forward(batch: Any) -> Any:
            loss, output = model_fwd(batch)
            return self.scale(loss), output

        return forward

    def get_scale(self) -> float:
        """The current scale S (a host sync)."""
        return self.scaler.get_scale()

    def unscale_table_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the tables get: ``grad / S``, or zeros if anything overflowed."""
        if self._inv_scale is None:
            raise RuntimeError(
                "a table-gradient boundary saw a gradient, but the loss was not scaled: "
                "run the model through LossScale.forward(...) (see compression/grad_scale.py)"
            )
        found = (~torch.isfinite(grad)).any().float()
        group = self.process_group
        if group is not None and dist.get_world_size(group) > 1:
            # Before any table sees its gradient, so an overflow on one rank skips
            # the tables' step on every rank (each rank's backward passes here once,
            # in the same order relative to the all-to-alls and DDP's all-reduces).
            # One scalar all-reduce per step, on the stream: no host sync.
            any_rank(found, group=group)
        self.found_inf += found
        unscaled = (grad.float() * self._inv_scale).to(grad.dtype)
        return torch.where(found > 0, torch.zeros_like(grad), unscaled)

    def end_step(self) -> None:
        self.found_inf.zero_()
        self._inv_scale = None


class _TableGradBoundary(torch.autograd.Function):
    """Identity forward; backward hands the tables the unscaled (or zeroed) gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss_scale: LossScale) -> torch.Tensor:
        ctx.loss_scale = loss_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.loss_scale.unscale_table_grad(grad), None


def install_table_boundary(model: nn.Module, loss_scale: LossScale) -> list[torch.Tensor]:
    """Puts the boundary on every torchrec ``SparseArch`` output; returns their parameters.

    The hook leaves non-tensor outputs alone: the train pipeline traces the model
    with torch.fx once (outputs are Proxies then), and eval runs need no backward.
    """
    arches = [m for m in model.modules() if isinstance(m, SparseArch)]
    if not arches:
        raise ValueError(
            "loss scaling puts the tables' gradient boundary on torchrec's SparseArch "
            f"(DLRM, DLRM-DCNv2); {type(model).__name__} has none"
        )

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            return _TableGradBoundary.apply(output, loss_scale)
        return None

    for arch in arches:
        arch.register_forward_hook(hook)
    return [p for arch in arches for p in arch.parameters()]


class _Unscalable:
    """What GradScaler unscales and steps: the dense groups plus the boundary's flag.

    GradScaler reads only ``param_groups`` and calls ``step()``, so this is the
    public contract; the flag is a one-element "gradient" that is inf exactly when
    the boundary saw an overflow.
    """

    def __init__(self, param_groups: list[Mapping[str, Any]], step: Callable[[], None]) -> None:
        self.param_groups = param_groups
        self.step = step


class LossScaledOptimizer(CombinedOptimizer):
    """The tables' fused optimizer plus the dense one, stepped through the loss scale.

    The same inner optimizers (and so the same ``state_dict``) as the
    CombinedOptimizer it wraps; only ``step`` differs. ``zero_grad`` is inherited.
    """

    def __init__(
        self,
        optimizer: CombinedOptimizer,
        *,
        loss_scale: LossScale,
        table_side_params: Iterable[torch.Tensor],
    ) -> None:
        super().__init__(optimizer.optimizers)
        self.loss_scale = loss_scale
        self._table_side = {id(p) for p in table_side_params}
        self._flag = torch.zeros((), device=loss_scale.found_inf.device)

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("LossScaledOptimizer.step takes no closure (GradScaler cannot)")
        ls = self.loss_scale
        self._flag.grad = torch.where(ls.found_inf > 0, float("inf"), 0.0)
        groups = [
            {"params": [p for p in g["params"] if id(p) not in self._table_side]}
            for g in self.param_groups
        ]
        groups.append({"params": [self._flag]})
        ls.scaler.step(_Unscalable(groups, self._step_all))  # host sync: skip or not
        ls.scaler.update()
        ls.end_step()

    def _step_all(self) -> None:
        for _, opt in self.optimizers:
            opt.step()


def enable_loss_scaling(
    model: nn.Module,
    optimizer: CombinedOptimizer,
    *,
    device: torch.device,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
    process_group: dist.ProcessGroup | None = None,
) -> LossScaledOptimizer:
    """Installs the table boundary on ``model``; returns ``optimizer`` stepping through it.

    The train pipeline must backpropagate ``optimizer.loss_scale.forward(fwd)``'s
    loss (``trainer.pipeline.make_pipeline`` does so for a LossScaledOptimizer).
    """
    loss_scale = LossScale(
        device=device,
        init_scale=init_scale,
        growth_interval=growth_interval,
        process_group=process_group,
    )
    table_side = install_table_boundary(model, loss_scale)
    # The fused tables' own parameters never hold a gradient; skip them outright.
    fused = getattr(model, "fused_optimizer", None)  # a DistributedModelParallel's
    if fused is not None:
        table_side += list(fused.params.values())
    return LossScaledOptimizer(optimizer, loss_scale=loss_scale, table_side_params=table_side)


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
