"""Applying a plan: DistributedModelParallel with the tables' optimizer fused in.

The embedding optimizer must already be attached with torchrec's
``apply_optimizer_in_backward`` (see :func:`fuse_embedding_optimizer`): the
sharders turn it into FBGEMM's fused update, so table gradients never
materialise. Everything that is not a table stays data parallel (DDP).

Example::

    fuse_embedding_optimizer(model.sparse_parameters(), lr=0.05)
    model = shard_model(model, plan=plan, env=env, sharders=sharders)
    optimizer = combined_optimizer(model, dense_optimizer="adam", dense_lr=1e-3)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sharding.dist import DistEnv

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
    """Shards the tables by ``plan``, materialises meta tensors, wraps the rest in DDP."""
    dmp = DistributedModelParallel(
        module=model,
        device=env.device,
        env=ShardingEnv.from_process_group(env.pg),
        plan=plan,
        sharders=sharders,
    )
    fix_dense_bucket_layout(dmp)
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
