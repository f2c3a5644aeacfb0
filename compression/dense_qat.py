"""Int8 weight-only quantization-aware training of the dense MLPs (``qat.dense_bits=8``).

Each ``nn.Linear`` of the DLRM's dense (bottom) arch and over arch gets a
``torch.nn.utils.parametrize`` parametrization on its weight: the forward reads
the weight fake-quantized per output channel, symmetric int8,

    scale[c] = max_k |W[c, k]| / 127          (a zero row gets a tiny floor)
    code[c, k] = clamp(round(W[c, k] / scale[c]), -127, 127)
    forward weight = code * scale[:, None]

computed by torch's own ``fake_quantize_per_channel_affine`` (zero point 0),
whose gradient is straight-through inside the range, which holds every weight
here since the scale comes from the row's own maximum. The fp32 master weight
(``parametrizations.weight.original``) is what the dense optimizer updates.
Activations and biases stay fp32. DCNv2's cross layers are plain parameters,
not Linears, and stay fp32.

For serving, :func:`quantize_dense_for_serving` swaps each such Linear for an
:class:`Int8WeightOnlyLinear` holding the int8 codes and fp32 scales; its
forward rebuilds exactly the fake-quantized weight, so the served logits equal
the QAT model's eval logits.

Example::

    hooked = enable_dense_qat(dmp)            # after sharding (see trainer/builder/model.py)
    # ['..dense_arch.model._mlp.0._linear', ..., '..over_arch.model.1']
    served = quantize_dense_for_serving(dlrm)  # a copy; dlrm is unchanged
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchrec.models.dlrm import DenseArch, OverArch

from compression.converter import Converter

QMAX = 127
# Floor of a scale, so that an all-zero row quantizes to zeros instead of nan.
_MIN_SCALE = 1e-12


def weight_scales(w: Tensor) -> Tensor:
    """Per output channel (row) symmetric int8 scales, ``max|W_c| / 127``, no gradient."""
    return (w.detach().abs().amax(dim=1) / QMAX).clamp(min=_MIN_SCALE).float()


def fake_quantize_linear_weight(w: Tensor) -> Tensor:
    """``code * scale`` per row; the gradient passes straight through to ``w``."""
    scale = weight_scales(w)
    zero_point = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, -QMAX, QMAX)


def quantize_linear_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """The int8 codes and fp32 scales with ``codes * scale[:, None] == fake_quantize(w)``."""
    w = w.detach()
    scale = weight_scales(w)
    # fake == code * scale exactly, so fake / scale is within an ulp of the code.
    codes = torch.round(fake_quantize_linear_weight(w) / scale[:, None]).to(torch.int8)
    return codes, scale


class _FakeQuantInt8(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize_linear_weight(w)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear served from int8 weight codes, per output channel fp32 scales, fp32 bias."""

    def __init__(self, codes: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        # A parametrized Linear's .weight is already fake-quantized; quantize its
        # fp32 master instead (a second rounding of the scale could move it an ulp).
        if parametrize.is_parametrized(linear, "weight"):
            master = linear.parametrizations.weight.original
        else:
            master = linear.weight
        codes, scale = quantize_linear_weight(master)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.codes.float() * self.scale[:, None], self.bias)


def dense_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of each Linear inside a DenseArch or OverArch of ``model``."""
    found = []
    for arch_name, arch in model.named_modules():
        if isinstance(arch, (DenseArch, OverArch)):
            for name, m in arch.named_modules():
                if isinstance(m, nn.Linear):
                    found.append((f"{arch_name}.{name}", m))
    return found


def enable_dense_qat(model: nn.Module) -> list[str]:
    """In place: the dense Linears' weights read fake-quantized int8; returns their names.

    Needs materialized weights (torch's fake quantization has no meta kernel, and
    DMP's in-place ``reset_parameters`` would write into the computed weight, not
    the master), so it is applied after sharding.
    """
    linears = dense_linears(model)
    if not linears:
        raise ValueError("enable_dense_qat found no nn.Linear in a DenseArch or OverArch")
    for _, linear in linears:
        if not parametrize.is_parametrized(linear, "weight"):
            parametrize.register_parametrization(linear, "weight", _FakeQuantInt8())
    return [name for name, _ in linears]


def quantize_dense_for_serving(model: nn.Module) -> nn.Module:
    """A copy of an unsharded model whose dense Linears are :class:`Int8WeightOnlyLinear`."""
    served = copy.deepcopy(model)
    for name, linear in dense_linears(served):
        parent_name, _, child = name.rpartition(".")
        setattr(served.get_submodule(parent_name), child, Int8WeightOnlyLinear.from_linear(linear))
    return served


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
