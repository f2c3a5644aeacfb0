"""Sharded tables on a CPU train with a compiled backward, FBGEMM's update bit for bit.

torchrec runs each shard's lookups through FBGEMM's table-batched embedding
(``SplitTableBatchedEmbeddingBagsCodegen``), whose backward applies the fused
row-wise Adagrad. On a CPU that backward is half of a multi-hot step: about
500 ns per row it updates, whatever the row's width (``benchmarks/tbe_backward.py``;
50 of 94 ms of the multi-hot bench step). :func:`use_compiled_backward` gives
the CPU kernels of a sharded model :class:`CompiledBackwardTBE`, whose forward
is FBGEMM's lookup op and whose backward is ``tbe_cpu_kernel``'s loop: the same
weights and accumulators, bit for bit, 3.5-6x faster. With several torch
threads the tables are updated in as many groups at once (:func:`table_groups`).

Where a kernel's case is not that loop's (a GPU, fp16 weights, per-id weights,
mean pooling, variable batch sizes, tables shared by features, weight decay or
gradient clipping), its forward is FBGEMM's own, unchanged. Nothing else
changes: the kernel's weights, accumulators, state dict and fused optimizer
are the same objects. ``SHARDREC_COMPILED_BACKWARD=0`` leaves every kernel to
FBGEMM; so does a machine without numba (one whose numba fails to load says
so in a warning).

Example::

    dmp = DistributedModelParallel(model, plan=plan, ...)
    use_compiled_backward(dmp)      # on a CPU: the number of kernels switched
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    OptimType,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

from sharding.compiled import load_compiled

log = logging.getLogger(__name__)

# SHARDREC_COMPILED_BACKWARD=0 keeps FBGEMM's CPU backward everywhere (read when a model
# is sharded, so a process may shard one model each way).
SWITCH = "SHARDREC_COMPILED_BACKWARD"

_kernel = None  # the compiled backward once imported (False: numba unusable)


class _Lookup(torch.autograd.Function):
    """FBGEMM's pooled CPU lookup forward; backward: the compiled fused update."""

    @staticmethod
    def forward(  # noqa: ANN205 - autograd's signature
        ctx: Any,
        placeholder: Tensor,
        tbe: CompiledBackwardTBE,
        indices: Tensor,
        offsets: Tensor,
    ):
        ctx.tbe = tbe
        ctx.save_for_backward(indices, offsets)
        return torch.ops.fbgemm.split_embedding_codegen_forward_cpu(
            tbe.weights_host,
            tbe.weights_offsets,
            tbe.D_offsets,
            tbe.total_D,
            tbe.hash_size_cumsum,
            indices,
            offsets,
            tbe.pooling_mode,
            None,
            tbe.output_dtype,
        )

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # noqa: ANN205
        indices, offsets = ctx.saved_tensors
        ctx.tbe.apply_update(grad_output, indices, offsets)
        return None, None, None, None


class CompiledBackwardTBE(SplitTableBatchedEmbeddingBagsCodegen):
    """FBGEMM's table-batched embedding whose CPU backward is ``tbe_cpu_kernel``'s.

    Not built directly: :func:`use_compiled_backward` gives existing kernels
    this class (``__class__``), so their tensors, buffers and hooks stay theirs.
    """

    def forward(  # type: ignore[override]
        self,
        indices: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None = None,
        feature_requires_grad: Tensor | None = None,
        batch_size_per_feature_per_rank: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if (
            per_sample_weights is not None
            or batch_size_per_feature_per_rank is not None
            or any(v is not None for v in kwargs.values())
        ):
            return super().forward(
                indices,
                offsets,
                per_sample_weights,
                feature_requires_grad,
                batch_size_per_feature_per_rank,
                **kwargs,
            )
        indices, offsets, _, _ = self.prepare_inputs(
            indices, offsets, None, None, force_cast_input_types=True
        )
        self._indices, self._offsets = indices, offsets
        self.step += 1
        # FBGEMM's iteration counters, as its forward counts them (checkpoints keep ``iter``).
        self.iter_cpu = self.iter_cpu.cpu()
        if self.iter_cpu.item() == 0:
            self.iter_cpu.fill_(self.iter.cpu().item())
        self.iter_cpu.add_(1)
        self.iter.add_(1)
        return _Lookup.apply(self.placeholder_autograd_tensor, self, indices, offsets)

    @torch.no_grad()
    def apply_update(self, grad_output: Tensor, indices: Tensor, offsets: Tensor) -> None:
        """Row-wise Adagrad on the rows ``indices`` looked up, from the pooled output's
        gradient; the tables in up to ``torch.get_num_threads()`` groups at once."""
        num_tables = len(self.feature_table_map)
        batch_size = (offsets.numel() - 1) // num_tables
        args = (
            grad_output.detach().to(torch.float32).contiguous().view(-1).numpy(),
            indices.numpy(),
            offsets.numpy(),
            batch_size,
            self.D_offsets.numpy(),
            self.weights_offsets.numpy(),
            self.momentum1_offsets.numpy(),
            np.diff(self.hash_size_cumsum.numpy()),
            self.weights_host.detach().numpy(),
            self.momentum1_host.detach().numpy(),
            np.float32(-self.get_learning_rate()),
            np.float32(self.optimizer_args.eps),
        )
        bounds = table_groups(offsets[::batch_size].numpy(), torch.get_num_threads())
        if len(bounds) == 2:
            failures = [_kernel(*args, bounds[0], bounds[1])]
        else:  # the kernel releases the GIL: the groups run on as many cores
            futures = [
                _threads(len(bounds) - 1).submit(_kernel, *args, first, last)
                for first, last in itertools.pairwise(bounds)
            ]
            failures = [f.result() for f in futures]
        failed = next((f for f in failures if f >= 0), -1)
        if failed >= 0:
            raise IndexError(
                f"embedding table {failed} of this kernel was looked up outside its "
                f"{int(self.rows_per_table[failed])} rows (no row was written outside "
                "the table); its ids passed FBGEMM's forward, so its bounds check is off"
            )


def table_groups(table_offsets: np.ndarray, threads: int) -> list[int]:
    """Bounds ``[0, ..., T]`` cutting the tables into at most ``threads`` runs of
    about equal lookups (``table_offsets``: the first lookup of each table, then the
    end); ``[0, T]`` for one thread or one table."""
    num_tables = len(table_offsets) - 1
    total = int(table_offsets[-1] - table_offsets[0])
    groups = min(threads, num_tables)
    if groups <= 1 or total == 0:
        return [0, num_tables]
    targets = table_offsets[0] + total * np.arange(1, groups) / groups
    cuts = np.searchsorted(table_offsets[1:-1], targets, side="left") + 1
    return sorted({0, num_tables, *cuts.tolist()})


_pool: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its size


def _threads(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` threads, made anew in a forked child (threads do not
    survive a fork)."""
    global _pool
    if _pool is None or _pool[1] < n:
        if _pool is not None:
            _pool[0].shutdown(wait=False)
        _pool = (ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardrec-tbe"), n)
    return _pool[0]


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def compiled_case(tbe: nn.Module) -> bool:
    """Whether ``tbe``'s backward can be the compiled one (see the module docstring)."""
    if type(tbe) is not SplitTableBatchedEmbeddingBagsCodegen:
        return False
    args = tbe.optimizer_args
    return (
        tbe.use_cpu
        and tbe.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD
        and not tbe._used_rowwise_adagrad_with_counter
        and not tbe._used_rowwise_adagrad_with_global_weight_decay
        and tbe.weights_precision == SparseType.FP32
        and tbe.output_dtype == SparseType.FP32.as_int()
        and tbe.pooling_mode == PoolingMode.SUM
        and list(tbe.feature_table_map) == list(range(len(tbe.feature_table_map)))
        and args.weight_decay == 0.0
        and not args.gradient_clipping
        and args.max_norm == 0.0
        and not tbe.use_writeback_bwd_prehook
        and tbe.tbe_input_multiplexer is None
        and tbe._report_input_params is None
        and tbe.momentum1_host.dtype == torch.float32
    )


def use_compiled_backward(model: nn.Module) -> int:
    """Switches ``model``'s CPU table-batched kernels to the compiled backward where
    their case allows; returns how many. Off with ``SHARDREC_COMPILED_BACKWARD=0``."""
    # The lookups sit in a plain list (ShardedEmbeddingBagCollection._lookups), which
    # model.modules() does not reach; torchrec walks the same list.
    kernels = [
        tbe
        for sebc in model.modules()
        if isinstance(sebc, ShardedEmbeddingBagCollection)
        for lookup in sebc._lookups
        for tbe in lookup.modules()
        if compiled_case(tbe)
    ]
    if not kernels or os.environ.get(SWITCH, "1") == "0" or _load() is None:
        return 0
    for tbe in kernels:
        tbe.__class__ = CompiledBackwardTBE
    log.info(
        "the sharded tables' fused update runs compiled on this CPU (%d kernels; "
        "%s=0 keeps FBGEMM's)",
        len(kernels),
        SWITCH,
    )
    return len(kernels)


def _load():  # noqa: ANN202 - a numba dispatcher, or None
    global _kernel
    if _kernel is None:
        _kernel = (
            load_compiled(
                _import_kernel,
                log=log,
                what="the compiled embedding backward",
                fallback="FBGEMM's runs (the same updates, slower)",
            )
            or False
        )
    return _kernel or None


def _import_kernel():  # noqa: ANN202
    from sharding.tbe_cpu_kernel import backward_rowwise_adagrad

    return backward_rowwise_adagrad
