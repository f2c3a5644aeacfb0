"""Applying a plan: DistributedModelParallel with the tables' optimizer fused in.

The embedding optimizer must already be attached with torchrec's
``apply_optimizer_in_backward`` (see :func:`fuse_embedding_optimizer`): the
sharders turn it into FBGEMM's fused update, so table gradients never
materialise. Everything that is not a table stays data parallel (DDP).

Example::

    fuse_embedding_optimizer(model.sparse_parameters(), lr=0.05)
    model = shard_model(model, plan=plan, env=env, sharders=sharders)
    optimizer = combined_optimizer(model, dense_optimizer="adam", dense_lr=1e-3)
    schedule = dense_lr_schedule(optimizer, warmup_steps=20, schedule="cosine", total_steps=500)
    schedule.step()   # after each training step (the loop does it)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sharding.dist import DistEnv
from sharding.tbe_cpu import use_compiled_backward

_DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def fuse_embedding_optimizer(
    params: Iterable[nn.Parameter], *, lr: float, eps: float = 1e-8
) -> None:
    """Row-wise Adagrad for the tables, run inside backward (FBGEMM's exact kernel)."""
    apply_optimizer_in_backward(RowWiseAdagrad, params, {"lr": lr, "eps": eps})


def shard_model(
    model: nn.Module,
    *,
    plan: ShardingPlan,
    env: DistEnv,
    sharders: list[ModuleSharder[nn.Module]],
) -> DistributedModelParallel:
    """Shards the tables by ``plan``, materialises meta tensors, wraps the rest in DDP;
    on a CPU the shards' fused updates run compiled (``sharding/tbe_cpu.py``)."""
    dmp = DistributedModelParallel(
        module=model,
        device=env.device,
        env=ShardingEnv.from_process_group(env.pg),
        plan=plan,
        sharders=sharders,
    )
    fix_dense_bucket_layout(dmp)
    use_compiled_backward(dmp)
    return dmp


def fix_dense_bucket_layout(dmp: DistributedModelParallel) -> None:
    """Gives DDP's gradient buckets, before the first step, the layout they keep.

    DDP all-reduces the dense gradients in flat buckets: for its first steps in
    parameter order, one bucket; then it rebuilds them in the order the gradients
    became ready. A ring all-reduce over more than two ranks sums each element in
    an order set by its position in the bucket, so a process's first steps round
    differently from its later ones, and a run resumed from a checkpoint (a
    torchrun restart, a SLURM requeue) drifts from the run that never stopped
    (4 ranks: eval log loss off by 1e-9 after 6 steps; 2 ranks add in one order).
    Rebuilt now (parameter order, DDP's 1 MiB first bucket and 25 MiB cap), the
    layout is the same for every step of every process. The price is that the
    bottom MLP's gradients, ready last, go in the first bucket, so the all-reduce
    overlaps less of the backward when the dense part spans several buckets.
    """
    ddp = dmp._dmp_wrapped_module
    if isinstance(ddp, DistributedDataParallel):
        ddp.reducer._push_all_rebuilt_params()  # private, in torch >= 1.8 (DDP's join hook)
        ddp.reducer._rebuild_buckets()


def combined_optimizer(
    model: DistributedModelParallel,
    *,
    dense_optimizer: str,
    dense_lr: float,
    dense_weight_decay: float = 0.0,
) -> CombinedOptimizer:
    """The fused table optimizer plus a keyed dense optimizer, stepped as one."""
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    cls = _DENSE_OPTIMIZERS[dense_optimizer]
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: cls(params, lr=dense_lr, weight_decay=dense_weight_decay),
    )
    return CombinedOptimizer([model.fused_optimizer, dense])


LR_SCHEDULES = ("constant", "cosine", "linear_decay")


class DenseLRSchedule:
    """The dense learning rate as a function of the global step, stepped once per step.

    ``warmup_steps`` steps ramp it linearly up to the base rate (step ``s`` trains at
    ``(s + 1) / warmup_steps`` of it), then it stays (``constant``) or decays to zero
    at ``total_steps`` (``cosine``, ``linear_decay``), where it stays, or, with
    ``restart_steps`` R > 0, decays again from the base rate over each R steps after
    it (warm restarts: a day walk's days). A torch ``LambdaLR`` on the
    dense optimizer only: the tables' fused Adagrad keeps its rate. Its one piece of
    state is the step, which a checkpoint already holds (the trainer's): a resumed
    run seeks to it (:meth:`seek`) and trains at the rates of one that never stopped.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        schedule: str,
        total_steps: int,
        restart_steps: int = 0,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"optim.dense_warmup_steps={warmup_steps} must be >= 0")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.dense_lr_schedule={schedule!r}: use one of {LR_SCHEDULES}")
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.total_steps = total_steps
        self.restart_steps = restart_steps
        self.scheduler = LambdaLR(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The base rate's multiplier for training step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.restart_steps > 0 and step >= self.total_steps:
            progress = (step - self.total_steps) % self.restart_steps / self.restart_steps
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    def step(self) -> None:
        """After each training step: the next step's rate."""
        self.scheduler.step()

    def seek(self, step: int) -> None:
        """Sets the rate of step ``step`` (a resume: ``step`` steps already trained)."""
        self.scheduler.last_epoch = step
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.factor(step)
        self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The rate the next step trains at, per parameter group."""
        return self.scheduler.get_last_lr()


def dense_lr_schedule(
    optimizer: CombinedOptimizer,
    *,
    warmup_steps: int,
    schedule: str,
    total_steps: int,
    restart_steps: int = 0,
) -> DenseLRSchedule | None:
    """The dense optimizer's schedule (:class:`DenseLRSchedule`); None when the rate is flat.

    ``optimizer``: what :func:`combined_optimizer` returned (the dense one is its last).
    """
    if warmup_steps == 0 and schedule == "constant":
        return None
    _, dense = optimizer.optimizers[-1]
    return DenseLRSchedule(
        dense,
        warmup_steps=warmup_steps,
        schedule=schedule,
        total_steps=total_steps,
        restart_steps=restart_steps,
    )
