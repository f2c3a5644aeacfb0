"""Low-rank dense layers: the MLP Linears factorized, ``W ~ U V`` (``lowrank_dense.mode``).

Each ``nn.Linear`` of a DLRM's dense (bottom) and over arch -- the same set
dense QAT and dense pruning act on; not the tables, not DCNv2's cross layers,
which have their own ``model.dcn_low_rank_dim`` -- becomes a
:class:`LowRankLinear`: ``down`` (``r x in``, U transposed) then ``up``
(``out x r``, V transposed, with the bias), two ``nn.Linear``\\ s, so dense QAT
fake-quantizes and serves both factors as it does any Linear. A layer stays
dense where rank ``r`` would not save: ``r (in + out) >= in out`` (the logit
layer ``[h -> 1]`` always).

How much each layer keeps (one of them):

- ``rank``: ``min(rank, in, out)`` for every layer;
- ``fraction``: ``r = floor(fraction * in * out / (in + out))`` (at least 1), so each
  layer keeps about that fraction of its weights (0.25: a quarter of the dense params);
- ``energy`` (``svd`` only): the fewest singular values whose squares sum to that
  fraction of the layer's total, chosen per layer at the SVD.

Two modes:

- ``from_start``: the factors are built with the model (on ``meta`` before
  planning) and trained from a random init (``down`` scaled so ``up @ down``
  has the variance of torch's Linear init);
- ``svd``: at ``start_step`` each trained Linear is replaced by its truncated
  SVD ``W = P S Q^T -> up = P_k S_k^(1/2), down = S_k^(1/2) Q_k^T`` (the bias
  kept), and training goes on (fine-tuning). To keep DDP, the optimizer and
  checkpoints seeing one fixed set of parameters, the layer is a
  :class:`SvdLowRankLinear` from the start: the dense Linear and a
  ``LowRankLinear`` of the largest rank it may need, blended by a 0/1 buffer
  (``(1 - f) full(x) + f low(x)``); before the swap the factors get zero
  gradients, after it the dense weight does. The swap runs on every rank
  (identical replicas; rank 0's factors are broadcast anyway), and resets the
  dense optimizer's state of those parameters in place (Adam's moments and
  step count back to 0: a moment built on zero gradients would give the fresh
  factors steps several times ``lr``). An ``energy`` layer is built at full
  rank ``min(in, out)``; a 0/1 ``keep`` buffer masks the dropped components,
  whose rows and columns are set to zero and get zero gradients. The buffers
  are model state, so a checkpoint after the swap resumes factorized; the
  converter checkpoints its step count.

At export :meth:`LowRankDense.to_serving` replaces each ``SvdLowRankLinear``
with a plain ``LowRankLinear`` of its kept rank (or its dense Linear if the
swap never came), before dense QAT quantizes the Linears: the served program
holds ``r (in + out)`` weights per layer.

Example::

    lowrank = LowRankDense(mode="svd", fraction=0.25, start_step=1000)
    model = lowrank.wrap_model(model)       # the meta model, before planning
    served = lowrank.to_serving(dlrm)       # a copy with the kept factors only
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchrec.models.dlrm import DenseArch, OverArch

from compression.converter import Converter, Forward

MODES = ("none", "from_start", "svd")


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


def _dense_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
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
    model: nn.Module, *, mode: str, rank: int = 0, fraction: float = 0.0, energy: float = 0.0
) -> dict[str, int]:
    """In place: the dense Linears that rank would shrink become factorized layers
    (``from_start``: :class:`LowRankLinear`; ``svd``: :class:`SvdLowRankLinear`).

    Returns ``{layer name: rank}`` (the capacity for ``svd`` with ``energy``). Works
    on ``meta``; layers that are already factorized are left as they are.
    """
    out: dict[str, int] = {}
    for name, linear in _dense_layers(model):
        if not isinstance(linear, nn.Linear):
            continue
        n_in, n_out = linear.in_features, linear.out_features
        if energy > 0:  # built at full rank; the SVD picks the rank
            r, least = min(n_in, n_out), 1
        else:
            r = least = layer_rank(n_in, n_out, rank=rank, fraction=fraction)
        if not saves(n_in, n_out, least):
            continue
        kwargs = {"bias": linear.bias is not None, "device": linear.weight.device}
        if mode == "from_start":
            layer: nn.Module = LowRankLinear(n_in, n_out, r, **kwargs)
        else:
            layer = SvdLowRankLinear(n_in, n_out, r, **kwargs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        out[name] = r
    return out


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
    layers = _dense_layers(model)
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


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class LowRankDense(Converter):
    """The dense Linears factorized from the start or by SVD at ``start_step``."""

    name = "lowrank_dense"

    def __init__(
        self,
        *,
        mode: str,
        rank: int = 0,
        fraction: float = 0.0,
        energy: float = 0.0,
        start_step: int = 0,
    ) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"lowrank_dense.mode={mode!r}: use from_start or svd")
        if sum(x > 0 for x in (rank, fraction, energy)) != 1:
            raise ValueError("lowrank_dense: give one of rank, fraction or energy (> 0)")
        if energy > 0 and mode != "svd":
            raise ValueError("lowrank_dense.energy needs lowrank_dense.mode=svd")
        self.mode, self.rank, self.fraction, self.energy = mode, rank, fraction, energy
        self.start_step = start_step
        self.step = 0
        self.layers: list[SvdLowRankLinear] = []
        self.model: nn.Module | None = None
        self.optimizer: Any = None
        self.process_group: Any = None
        self.served_report: dict[str, Any] = {}

    def wrap_model(self, model: nn.Module) -> nn.Module:
        factorize_dense(
            model, mode=self.mode, rank=self.rank, fraction=self.fraction, energy=self.energy
        )
        return model

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        self.model, self.process_group = model, process_group
        self.layers = [m for m in model.modules() if isinstance(m, SvdLowRankLinear)]

    def wrap_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        process_group: Any,
    ) -> torch.optim.Optimizer:
        self.optimizer = optimizer  # its dense state is reset at the swap
        return optimizer

    def wrap_forward(self, forward: Forward) -> Forward:
        if self.mode != "svd":
            return forward

        def counted(batch: Any) -> Any:
            if self.layers and self.layers[0].training:
                if self.step == self.start_step:
                    self.factorize()
                self.step += 1
            return forward(batch)

        return counted

    @torch.no_grad()
    def factorize(self) -> dict[str, int]:
        """The swap (module docstring), on every rank; returns the rank kept per layer."""
        kept = {}
        for i, layer in enumerate(self.layers):
            kept[i] = layer.factorize(rank=layer.low.rank, energy=self.energy)
            if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
                for t in [*layer.low.parameters(), layer.keep]:
                    dist.broadcast(t.data, group=self.process_group, group_src=0)
            if self.optimizer is not None:
                reset_optimizer_state(self.optimizer, list(layer.parameters()))
        return kept

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)} if self.mode == "svd" else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "step" in state:
            self.step = int(state["step"])

    def to_serving(self, model: nn.Module) -> nn.Module:
        served = copy.deepcopy(model)
        for name, layer in _dense_layers(served):
            if isinstance(layer, SvdLowRankLinear):
                parent, _, child = name.rpartition(".")
                setattr(served.get_submodule(parent), child, layer.served())
        self.served_report = dense_report(served)
        return served

    def _settings(self) -> dict[str, Any]:
        how = {"rank": self.rank, "fraction": self.fraction, "energy": self.energy}
        return {"mode": self.mode, **{k: v for k, v in how.items() if v}} | (
            {"start_step": self.start_step} if self.mode == "svd" else {}
        )

    def summary(self) -> dict[str, Any]:
        model = _unwrap(self.model) if self.model is not None else None
        report = dense_report(model) if model is not None else {}
        return {"lowrank_dense": self._settings() | report}

    def export_summary(self) -> dict[str, Any]:
        return {"lowrank_dense": self._settings() | self.served_report}
