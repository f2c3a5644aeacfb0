"""The low-rank layers behind ``lowrank_dense`` (compression/lowrank_dense.py).

:class:`LowRankLinear` (``down`` then ``up``, two ``nn.Linear``), the truncated
SVD that makes one from a trained Linear, :class:`SvdLowRankLinear` (the dense
Linear and its factors blended by a 0/1 buffer, so the parameter set never
changes at the swap), :func:`factorize_dense` over a DLRM's dense and over
arches, the per-layer report and the optimizer-state reset used at the swap.
The choices (rank, fraction, energy; from_start or svd) are described in
compression/lowrank_dense.py.

Example::

    layer = LowRankLinear(in_features=64, out_features=32, rank=8)
    up, down = svd_factors(trained.weight, rank=8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchrec.models.dlrm import DenseArch, OverArch

from compression.lowrank_allocate import allocate_ranks, check_fraction, max_saving_rank


class _DownFactor(nn.Linear):
    """``down`` of a from-start factorization: a Linear whose init is ``sqrt(3)`` wider,
    so ``up @ down`` starts with the variance of a dense Linear's init (``1 / (3 in)``)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.mul_(math.sqrt(3.0))


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: ``down`` ``[rank x in]`` (no bias), ``up`` ``[out x rank]`` (bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = _DownFactor(in_features, rank, bias=False, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device)

    @property
    def rank(self) -> int:
        return self.up.in_features

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        hidden = self.down(x)
        return self.up(hidden if keep is None else hidden * keep)


def master_weight(linear: nn.Linear) -> Tensor:
    """The weight the optimizer updates (the fp32 master under dense QAT's parametrization)."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(down [rank x in], up [out x rank])`` with ``up @ down`` the best rank-``rank``
    approximation of ``weight`` (exact at ``min(in, out)``)."""
    p, s, qh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * qh[:rank], p[:, :rank] * root[None, :]


def energy_rank(weight: Tensor, energy: float) -> int:
    """The fewest singular values of ``weight`` whose squares reach ``energy`` of the total."""
    s2 = torch.linalg.svdvals(weight.detach().float()) ** 2
    share = torch.cumsum(s2, 0) / s2.sum().clamp(min=torch.finfo(s2.dtype).tiny)
    return min(int((share < energy - 1e-7).sum()) + 1, s2.numel())


def saves(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank ``rank`` stores fewer weights than the dense ``[out x in]``."""
    return rank * (in_features + out_features) < in_features * out_features


def layer_rank(in_features: int, out_features: int, *, rank: int, fraction: float) -> int:
    """The rank a layer gets from ``rank`` or ``fraction`` (module docstring)."""
    if rank > 0:
        return min(rank, in_features, out_features)
    by_fraction = math.floor(fraction * in_features * out_features / (in_features + out_features))
    return max(1, by_fraction)


class SvdLowRankLinear(nn.Module):
    """A dense Linear until :meth:`factorize`, then its truncated SVD, fine-tuned
    (module docstring). ``capacity``: the largest rank the swap may keep."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        *,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.full = nn.Linear(in_features, out_features, bias=bias, device=device)
        self.low = LowRankLinear(in_features, out_features, capacity, bias=bias, device=device)
        # Zeros, as DMP materialises meta buffers: not yet factorized, nothing kept.
        self.register_buffer("factorized", torch.zeros((), device=device))
        self.register_buffer("keep", torch.zeros(capacity, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # Both branches always run, so every parameter gets a gradient (zero for the
        # branch that is off) and DDP's reducer sees the same parameters every step.
        f = self.factorized
        return (1 - f) * self.full(x) + f * self.low(x, self.keep)

    @property
    def kept_rank(self) -> int:
        return int(self.keep.sum())

    @torch.no_grad()
    def factorize(self, *, rank: int = 0, energy: float = 0.0) -> int:
        """Switches to the truncated SVD of the dense weight; returns the rank kept."""
        weight = master_weight(self.full)
        k = energy_rank(weight, energy) if energy > 0 else rank
        k = min(k, self.low.rank)
        down, up = svd_factors(weight, k)
        down_w, up_w = master_weight(self.low.down), master_weight(self.low.up)
        down_w.zero_()
        up_w.zero_()
        down_w[:k] = down
        up_w[:, :k] = up
        if self.full.bias is not None:
            self.low.up.bias.copy_(self.full.bias)
        self.keep.zero_()
        self.keep[:k] = 1
        self.factorized.fill_(1)
        return k

    @torch.no_grad()
    def served(self) -> nn.Module:
        """A plain module computing what this one computes: the kept factors, or the
        dense Linear when not factorized (fp32 master weights, no parametrization)."""
        device = self.keep.device
        has_bias = self.full.bias is not None
        if not bool(self.factorized):
            dense = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=device)
            dense.weight.copy_(master_weight(self.full))
            if has_bias:
                dense.bias.copy_(self.full.bias)
            return dense
        k = self.kept_rank
        low = LowRankLinear(self.in_features, self.out_features, k, bias=has_bias, device=device)
        low.down.weight.copy_(master_weight(self.low.down)[:k])
        low.up.weight.copy_(master_weight(self.low.up)[:, :k])
        if has_bias:
            low.up.bias.copy_(self.low.up.bias)
        return low


_FACTORIZED = (LowRankLinear, SvdLowRankLinear)


def dense_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each dense/over-arch layer: plain Linears not inside a
    factorized layer, and the factorized layers themselves."""
    found: list[tuple[str, nn.Module]] = []
    for arch_name, arch in model.named_modules():
        if not isinstance(arch, (DenseArch, OverArch)):
            continue
        inner: set[str] = set()
        for name, m in arch.named_modules():
            if any(name.startswith(f"{p}.") for p in inner):
                continue
            if isinstance(m, _FACTORIZED):
                inner.add(name)
                found.append((f"{arch_name}.{name}", m))
            elif isinstance(m, nn.Linear):
                found.append((f"{arch_name}.{name}", m))
    return found


def factorize_dense(
    model: nn.Module,
    *,
    mode: str,
    rank: int = 0,
    fraction: float = 0.0,
    energy: float = 0.0,
    allocate: str = "per_layer",
    ranks: Sequence[int] = (),
) -> dict[str, int]:
    """In place: the dense Linears that rank would shrink become factorized layers
    (``from_start``: :class:`LowRankLinear`; ``svd``: :class:`SvdLowRankLinear`).

    ``allocate="global"`` spreads ``fraction`` of all the dense parameters over the
    layers (compression/lowrank_allocate.py): ``from_start`` builds those ranks;
    ``svd`` builds each layer at the largest rank that saves, chosen at the swap.
    ``ranks``: one per dense Linear in model order (0: stays dense), capped like ``rank``.
    Returns ``{layer name: rank}`` (the capacity for ``svd`` with ``energy`` or
    ``global``). Works on ``meta``; layers already factorized are left as they are.
    """
    out: dict[str, int] = {}
    if ranks:
        layers = dense_layers(model)
        if len(ranks) != len(layers):
            raise ValueError(
                f"lowrank_dense.ranks has {len(ranks)} entries; the model has "
                f"{len(layers)} dense Linears (bottom MLP, then top MLP with the logit layer)"
            )
        for (name, linear), r in zip(layers, ranks):
            if r and isinstance(linear, nn.Linear):
                r = min(r, linear.in_features, linear.out_features)
                out[name] = _replace(model, name, linear, mode=mode, rank=r)
        return out
    if allocate == "global":
        layers = dense_layers(model)
        if not all(isinstance(m, nn.Linear) for _, m in layers):
            return out
        shapes = [(m.in_features, m.out_features, m.bias is not None) for _, m in layers]
        check_fraction(shapes, fraction)  # svd: at build, not at the swap
        if mode == "from_start":
            ranks = allocate_ranks(shapes, fraction=fraction)
        else:
            ranks = [max_saving_rank(i, o) for i, o, _ in shapes]
        for (name, linear), r in zip(layers, ranks):
            if r:
                out[name] = _replace(model, name, linear, mode=mode, rank=r)
        return out
    for name, linear in dense_layers(model):
        if not isinstance(linear, nn.Linear):
            continue
        n_in, n_out = linear.in_features, linear.out_features
        if energy > 0:  # built at full rank; the SVD picks the rank
            r, least = min(n_in, n_out), 1
        else:
            r = least = layer_rank(n_in, n_out, rank=rank, fraction=fraction)
        if not saves(n_in, n_out, least):
            continue
        out[name] = _replace(model, name, linear, mode=mode, rank=r)
    return out


def _replace(model: nn.Module, name: str, linear: nn.Linear, *, mode: str, rank: int) -> int:
    kwargs = {"bias": linear.bias is not None, "device": linear.weight.device}
    n_in, n_out = linear.in_features, linear.out_features
    if mode == "from_start":
        layer: nn.Module = LowRankLinear(n_in, n_out, rank, **kwargs)
    else:
        layer = SvdLowRankLinear(n_in, n_out, rank, **kwargs)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return rank


def _layer_params(m: nn.Module) -> tuple[int, int]:
    """(weights + biases as served, as a dense Linear) of one dense layer."""
    with_bias = {SvdLowRankLinear: "full", LowRankLinear: "up"}.get(type(m))
    bias_of = getattr(m, with_bias) if with_bias else m
    bias = m.out_features if bias_of.bias is not None else 0
    dense = m.in_features * m.out_features + bias
    if isinstance(m, SvdLowRankLinear) and bool(m.factorized):
        return m.kept_rank * (m.in_features + m.out_features) + bias, dense
    if isinstance(m, LowRankLinear):
        return m.rank * (m.in_features + m.out_features) + bias, dense
    return dense, dense


def dense_report(model: nn.Module) -> dict[str, Any]:
    """Ranks per factorized layer and the served / full-rank dense parameter counts."""
    layers = dense_layers(model)
    counts = [_layer_params(m) for _, m in layers]
    served, full = sum(c[0] for c in counts), sum(c[1] for c in counts)
    ranks = {}
    for name, m in layers:
        if isinstance(m, LowRankLinear):
            ranks[name] = m.rank
        elif isinstance(m, SvdLowRankLinear) and bool(m.factorized):
            ranks[name] = m.kept_rank
    return {
        "ranks": ranks,
        "dense_params": served,
        "full_rank_dense_params": full,
        "dense_params_fraction": served / max(full, 1),
    }


@torch.no_grad()
def reset_optimizer_state(optimizer: Any, params: list[nn.Parameter]) -> int:
    """Zeroes, in place, every state tensor the optimizer keeps for ``params`` (Adam's
    moments and step count; Adagrad's sums): as if they had just been added. Returns
    how many parameters had state."""
    state = optimizer.state
    reset = 0
    for p in params:
        entry = state.get(p) if hasattr(state, "get") else None
        if not entry:
            continue
        for value in entry.values():
            if isinstance(value, Tensor):
                value.zero_()
        reset += 1
    return reset
