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
  fraction of the layer's total, chosen per layer at the SVD;
- ``ranks``: one rank per dense Linear in model order (bottom MLP, then top MLP
  with the logit layer; 0: stays dense), each capped at ``min(in, out)``.

``allocate`` says how ``fraction`` is read: ``per_layer`` (above) or ``global``:
one budget of ``fraction`` of all the dense parameters, spent on the layers whose
spectra keep the most per weight (compression/lowrank_allocate.py; the trained
spectra at the swap under ``svd``, flat ones under ``from_start``). The ranks
chosen are logged and reported in the summary.

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
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from compression.converter import Converter, Forward
from compression.lowrank_allocate import allocate_ranks
from compression.lowrank_layers import (
    SvdLowRankLinear,
    dense_layers,
    dense_report,
    factorize_dense,
    master_weight,
    reset_optimizer_state,
)
from compression.names import LOWRANK_DENSE_ALLOCATIONS, LOWRANK_DENSE_MODES

MODES = LOWRANK_DENSE_MODES
ALLOCATIONS = LOWRANK_DENSE_ALLOCATIONS
log = logging.getLogger(__name__)


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
        allocate: str = "per_layer",
        ranks: tuple[int, ...] = (),
    ) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"lowrank_dense.mode={mode!r}: use from_start or svd")
        if sum(bool(x) for x in (rank, fraction, energy, ranks)) != 1:
            raise ValueError("lowrank_dense: give one of rank, fraction, energy or ranks")
        if energy > 0 and mode != "svd":
            raise ValueError("lowrank_dense.energy needs lowrank_dense.mode=svd")
        if allocate not in ALLOCATIONS or (allocate == "global" and not fraction):
            raise ValueError("lowrank_dense.allocate: per_layer, or global with a fraction")
        self.mode, self.rank, self.fraction, self.energy = mode, rank, fraction, energy
        self.allocate, self.ranks = allocate, tuple(ranks)
        self.start_step = start_step
        self.step = 0
        self.layers: list[SvdLowRankLinear] = []
        self.model: nn.Module | None = None
        self.optimizer: Any = None
        self.process_group: Any = None
        self.served_report: dict[str, Any] = {}

    def wrap_model(self, model: nn.Module) -> nn.Module:
        ranks = factorize_dense(
            model,
            mode=self.mode,
            rank=self.rank,
            fraction=self.fraction,
            energy=self.energy,
            allocate=self.allocate,
            ranks=self.ranks,
        )
        if self.mode == "from_start":
            log.info("lowrank_dense ranks: %s", ranks)
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
        ranks = self._global_ranks() if self.allocate == "global" else {}
        kept = {}
        for i, layer in enumerate(self.layers):
            rank = ranks.get(id(layer), layer.low.rank)
            kept[i] = layer.factorize(rank=rank, energy=self.energy)
            if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
                for t in [*layer.low.parameters(), layer.keep]:
                    dist.broadcast(t.data, group=self.process_group, group_src=0)
            if self.optimizer is not None:
                reset_optimizer_state(self.optimizer, list(layer.parameters()))
        log.info("lowrank_dense: SVD at step %d, ranks kept %s", self.step, kept)
        return kept

    def _global_ranks(self) -> dict[int, int]:
        """``{id(layer): rank}`` from one budget over the trained spectra (module docstring)."""
        layers = [m for _, m in dense_layers(self.model)]
        shapes, spectra = [], []
        for m in layers:
            linear = m.full if isinstance(m, SvdLowRankLinear) else m
            shapes.append((m.in_features, m.out_features, linear.bias is not None))
            factorized = isinstance(m, SvdLowRankLinear)
            spectra.append(torch.linalg.svdvals(master_weight(linear)) if factorized else None)
        ranks = allocate_ranks(shapes, fraction=self.fraction, spectra=spectra)
        return {id(m): r for m, r in zip(layers, ranks) if isinstance(m, SvdLowRankLinear)}

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)} if self.mode == "svd" else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "step" in state:
            self.step = int(state["step"])

    def to_serving(self, model: nn.Module) -> nn.Module:
        served = copy.deepcopy(model)
        for name, layer in dense_layers(served):
            if isinstance(layer, SvdLowRankLinear):
                parent, _, child = name.rpartition(".")
                setattr(served.get_submodule(parent), child, layer.served())
        self.served_report = dense_report(served)
        return served

    def _settings(self) -> dict[str, Any]:
        how = {"rank": self.rank, "fraction": self.fraction, "energy": self.energy}
        how["allocate"] = self.allocate if self.fraction else ""
        return {"mode": self.mode, **{k: v for k, v in how.items() if v}} | (
            {"start_step": self.start_step} if self.mode == "svd" else {}
        )

    def summary(self) -> dict[str, Any]:
        model = _unwrap(self.model) if self.model is not None else None
        report = dense_report(model) if model is not None else {}
        return {"lowrank_dense": self._settings() | report}

    def export_summary(self) -> dict[str, Any]:
        return {"lowrank_dense": self._settings() | self.served_report}
