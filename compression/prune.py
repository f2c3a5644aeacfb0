"""Pruning: embedding rows at export, dense MLP weights by magnitude during training.

**Rows** (:class:`RowPruning`): at export, each table's rows below a threshold
are dropped -- ``prune.rows_by=norm``: L2 norm below ``prune.row_min_norm``;
``prune.rows_by=access``: looked up fewer than ``prune.min_access`` times in
training (counted by compression/access_counts.py, checkpointed with the
converter's state). The ids that pointed at dropped rows are remapped to one
shared default row (the mean of the dropped rows), so the served table has
``kept + 1`` rows. The served model remaps ids in front of its sparse arch
(:class:`RemapIds`); every kept id reads exactly its own row, so predictions of
samples whose ids are all kept do not change. Rows of ids never seen in
training keep their initial values, and rows that training pushed towards
zero carry little signal: these are the ones that go.

**Dense** (:class:`DensePruning`, ``prune.dense_sparsity``): the Linear weights
of the dense and over arches are pruned by magnitude (torch's
``L1Unstructured`` per Linear) to a sparsity raised in equal steps from
``start_step`` to ``end_step``; the mask is applied in place when it changes
and after every optimizer step (the forward never sees a pruned weight), so
the trained weights are ordinary tensors that export as they are.

Example::

    converters = Converters([..., DensePruning(sparsity=0.5, start_step=0, end_step=1000,
                                               every_steps=100), RowPruning(min_norm=0.01)])
    served = RowPruning(min_norm=0.01).to_serving(dlrm)   # a pruned copy
    by_access = RowPruning(min_access=1, feature_rows={"cat_0": 40, ...})  # counts in training
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import L1Unstructured
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.access_counts import AccessCounter
from compression.converter import Converter, Forward
from compression.dense_qat import dense_linears


class RemapIds(nn.Module):
    """``module`` with each listed feature's ids mapped through ``remap[feature]``."""

    def __init__(self, module: nn.Module, remaps: dict[str, Tensor]) -> None:
        super().__init__()
        self.module = module
        self.features = list(remaps)
        for i, remap in enumerate(remaps.values()):
            self.register_buffer(f"remap_{i}", remap)

    def forward(self, features: KeyedJaggedTensor) -> Any:
        values = features.values().clone()
        offsets = features.offset_per_key()
        for i, key in enumerate(features.keys()):
            if key in self.features:
                remap = getattr(self, f"remap_{self.features.index(key)}")
                lo, hi = offsets[i], offsets[i + 1]
                values[lo:hi] = remap[values[lo:hi]]
        remapped = KeyedJaggedTensor(
            keys=features.keys(),
            values=values,
            lengths=features.lengths(),
            weights=features.weights_or_none(),
        )
        return self.module(remapped)


@torch.no_grad()
def prune_rows(
    model: nn.Module,
    *,
    min_norm: float = 0.0,
    access_counts: dict[str, Tensor] | None = None,
    min_access: int = 0,
) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    """A copy of the unsharded ``model`` with rows dropped (module docstring).

    Without ``access_counts`` a row goes when its L2 norm is below ``min_norm``;
    with them (per feature, as :class:`compression.access_counts.AccessCounter`
    gives them; a table's count is the sum over its features) when it was looked
    up fewer than ``min_access`` times. Returns the copy and, per table,
    ``{"rows", "rows_kept", "fp32_bytes", "fp32_bytes_kept"}`` (the last with the
    default row). The EmbeddingBagCollection is wrapped in :class:`RemapIds`.
    """
    pruned = copy.deepcopy(model)
    report: dict[str, dict[str, int]] = {}
    for parent in list(pruned.modules()):
        for child_name, ebc in list(parent.named_children()):
            if not isinstance(ebc, EmbeddingBagCollection):
                continue
            configs, weights, remaps = [], {}, {}
            for config in ebc.embedding_bag_configs():
                weight = ebc.embedding_bags[config.name].weight
                if access_counts is None:
                    keep = weight.norm(dim=1) >= min_norm
                else:
                    counts = sum(access_counts[f].cpu() for f in config.feature_names)
                    keep = torch.as_tensor(counts) >= min_access
                num_kept = int(keep.sum())
                row_bytes = weight.shape[1] * 4
                report[config.name] = {
                    "rows": weight.shape[0],
                    "rows_kept": num_kept,
                    "fp32_bytes": weight.shape[0] * row_bytes,
                    "fp32_bytes_kept": min(num_kept + 1, weight.shape[0]) * row_bytes,
                }
                if num_kept == weight.shape[0]:
                    configs.append(config)
                    weights[config.name] = weight
                    continue
                remap = torch.full((weight.shape[0],), num_kept, dtype=torch.int64)
                remap[keep] = torch.arange(num_kept)
                default = weight[~keep].mean(dim=0, keepdim=True)
                weights[config.name] = torch.cat([weight[keep], default])
                configs.append(replace(config, num_embeddings=num_kept + 1))
                for feature in config.feature_names:
                    remaps[feature] = remap
            if not remaps:
                continue
            small = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
            for name, weight in weights.items():
                small.embedding_bags[name].weight.copy_(weight)
            setattr(parent, child_name, RemapIds(small, remaps))
    return pruned, report


class RowPruning(Converter):
    """Export: drop rows by L2 norm (``min_norm``) or by training access count
    (``min_access``, counting the features of ``feature_rows``), before quantization.

    With ``min_access`` the converter counts each training step's ids
    (``wrap_forward``; eval batches are not counted) and keeps the counts as
    its checkpoint state (collective: the ranks' counts are summed).
    """

    name = "row_pruning"

    def __init__(
        self,
        *,
        min_norm: float = 0.0,
        min_access: int = 0,
        feature_rows: dict[str, int] | None = None,
    ) -> None:
        if (min_norm > 0) == (min_access > 0):
            raise ValueError("RowPruning: give min_norm or min_access (one of them)")
        if min_access and not feature_rows:
            raise ValueError("RowPruning(min_access=...) needs feature_rows to count")
        self.min_norm = min_norm
        self.min_access = min_access
        self.counter = AccessCounter(feature_rows or {}) if min_access else None
        self.model: nn.Module | None = None
        self.process_group: Any = None
        self.report: dict[str, dict[str, int]] = {}

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        self.model, self.process_group = model, process_group
        if self.counter is not None:
            self.counter.to(device)

    def wrap_forward(self, forward: Forward) -> Forward:
        counter = self.counter
        if counter is None:
            return forward

        def counting(batch: Any) -> Any:
            if self.model is None or self.model.training:  # training steps only
                counter.add(batch.sparse_features)
            return forward(batch)

        return counting

    def state_dict(self) -> dict[str, Tensor]:
        if self.counter is None:
            return {}
        # Collective: DCP saves one replicated tensor per feature, the global count.
        synced = self.counter.synced(self.process_group)
        return {f"access_{feature}": counts for feature, counts in synced.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.counter is None:
            return
        self.counter.load(
            {f: state[f"access_{f}"] for f in self.counter.feature_rows if f"access_{f}" in state},
            self.process_group,
        )

    def access_counts(self) -> dict[str, Tensor] | None:
        """Collective: the global counts per feature (None when pruning by norm)."""
        return None if self.counter is None else self.counter.synced(self.process_group)

    def to_serving(self, model: nn.Module) -> nn.Module:
        counts = None
        if self.counter is not None:
            # Export runs on rank 0 alone, after a checkpoint-style sync (see export_step):
            # rank 0's counter then holds the totals.
            counts = self.counter.local()
        pruned, self.report = prune_rows(
            model, min_norm=self.min_norm, access_counts=counts, min_access=self.min_access
        )
        return pruned

    def export_summary(self) -> dict[str, Any]:
        r = self.report.values()
        rows, kept = sum(t["rows"] for t in r), sum(t["rows_kept"] for t in r)
        fp32_bytes, fp32_kept = (
            sum(t["fp32_bytes"] for t in r),
            sum(t["fp32_bytes_kept"] for t in r),
        )
        by = (
            {"rows_by": "norm", "min_norm": self.min_norm}
            if self.counter is None
            else {"rows_by": "access", "min_access": self.min_access}
        )
        return {
            "row_pruning": {
                **by,
                "rows": rows,
                "rows_kept": kept,
                "rows_kept_fraction": kept / max(rows, 1),
                "fp32_bytes_saved": fp32_bytes - fp32_kept,
                "tables": self.report,
            }
        }


def _weight(linear: nn.Linear) -> Tensor:
    """The trained weight (the master one under dense QAT's parametrization)."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


class DensePruning(Converter):
    """Magnitude pruning of the dense Linears on a schedule (module docstring)."""

    name = "dense_pruning"

    def __init__(
        self, *, sparsity: float, start_step: int, end_step: int, every_steps: int
    ) -> None:
        self.sparsity = sparsity
        self.start_step = start_step
        self.end_step = max(end_step, start_step)
        self.every_steps = every_steps
        self.step = 0
        self.linears: list[nn.Linear] = []
        self.masks: list[Tensor] = []

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step`` (0 before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        span = self.end_step - self.start_step
        if span == 0 or step >= self.end_step:
            return self.sparsity
        done = (step - self.start_step) // self.every_steps * self.every_steps
        return self.sparsity * done / span

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        self.linears = [m for _, m in dense_linears(model)]
        self.masks = [torch.ones_like(_weight(m)) for m in self.linears]

    def wrap_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        process_group: Any,
    ) -> torch.optim.Optimizer:
        # After every step too, so the trained (and exported) weights hold the zeros.
        step = optimizer.step

        def step_then_mask(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            self._apply_masks()
            return out

        optimizer.step = step_then_mask  # type: ignore[method-assign]
        return optimizer

    @torch.no_grad()
    def _update_masks(self) -> None:
        amount = self.target(self.step)
        for i, linear in enumerate(self.linears):
            w = _weight(linear)
            # The same weights on every rank (DDP), so the same masks everywhere.
            self.masks[i] = L1Unstructured(amount).compute_mask(w, torch.ones_like(w))

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for linear, mask in zip(self.linears, self.masks):
            _weight(linear).mul_(mask)

    def wrap_forward(self, forward: Forward) -> Forward:
        def pruned(batch: Any) -> Any:
            training = any(m.training for m in self.linears)
            if training:
                due = self.step >= self.start_step and (
                    (self.step - self.start_step) % self.every_steps == 0
                    or self.step == self.end_step
                )
                if due and self.step <= self.end_step:
                    self._update_masks()
                    self._apply_masks()
                self.step += 1
            return forward(batch)

        return pruned

    def state_dict(self) -> dict[str, Tensor]:
        state = {"step": torch.tensor(self.step, dtype=torch.int64)}
        return state | {f"mask_{i}": mask for i, mask in enumerate(self.masks)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        for i in range(len(self.masks)):
            if f"mask_{i}" in state:
                self.masks[i] = state[f"mask_{i}"].clone()
        self._apply_masks()

    def sparsity_reached(self) -> float:
        weights = [_weight(linear) for linear in self.linears]
        zeros = sum(int((w == 0).sum()) for w in weights)
        return zeros / max(sum(w.numel() for w in weights), 1)

    def summary(self) -> dict[str, Any]:
        return {"dense_pruning": {"target": self.sparsity, "reached": self.sparsity_reached()}}


def prune_converters(
    *,
    row_min_norm: float,
    dense_sparsity: float,
    dense_start_step: int,
    dense_end_step: int,
    dense_every_steps: int,
    rows_by: str = "norm",
    min_access: int = 0,
    feature_rows: dict[str, int] | None = None,
) -> list[Converter]:
    """The pruning converters that are on (dense first: it acts in training).

    ``rows_by``: ``norm`` (``row_min_norm`` > 0 turns row pruning on) or
    ``access`` (``min_access`` > 0; ``feature_rows`` says what to count).
    """
    out: list[Converter] = []
    if dense_sparsity > 0:
        out.append(
            DensePruning(
                sparsity=dense_sparsity,
                start_step=dense_start_step,
                end_step=dense_end_step,
                every_steps=dense_every_steps,
            )
        )
    if rows_by == "norm" and row_min_norm > 0:
        out.append(RowPruning(min_norm=row_min_norm))
    if rows_by == "access" and min_access > 0:
        out.append(RowPruning(min_access=min_access, feature_rows=feature_rows))
    return out
