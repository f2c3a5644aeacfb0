"""Quantization-aware training of sharded embedding tables, straight-through.

Applied after DistributedModelParallel has sharded the model. Each sharded
embedding kernel (torchrec's ``BaseBatchedEmbeddingBag``, wrapping one FBGEMM
table-batched module that holds several local table shards) gets two hooks:

* before its forward, the rows this batch looks up in a QAT table are saved
  and overwritten in the TBE weights by :func:`fake_quantize_rows` of
  themselves, so the lookup returns what the served int8/int4 model returns;
* right after its forward (before backward), the saved fp32 master rows are
  written back.

The TBE's weight gradient depends only on the output gradient and the indices,
not on the weight values, so the fused optimizer (FBGEMM's row-wise Adagrad,
run inside backward; for data-parallel tables, autograd and the dense
optimizer) updates the restored master rows with the gradient taken at the
quantized point: a straight-through estimator, without quantizing whole
tables. Quantization is per row, so quantizing only the looked-up rows is exact.
Eval forwards run the same hooks, so evaluation sees the quantized model.
(With weighted features, the gradient of the per-id weights would be taken at
the master rows; the models here have none.)

Column-wise (and table-column-wise, grid) shards hold some columns of each
row, but serving quantizes whole rows: the scale and bias come from the row's
minimum and maximum over all its columns. For those tables every forward first
takes the looked-up rows' min/max over the local columns, then one all-reduce
(``MIN`` over ``[min, -max]``) among the ranks holding the other column slices
of the same rows (a process group per table and row block, made once from the
plan), and quantizes the local columns against the whole row's range with
:func:`fake_quantize_columns` (FBGEMM's own quantizer, bit for bit). With
``row_range="mse"`` the range is then fitted to the whole row (compression/
row_range.py) from per-row sums all-reduced (``SUM``) among the same ranks,
once per fit step, and the columns are clamped to it. All column
slices of a table receive the same ids in the same order (the input
distribution sends a feature to each of its table's column shards alike), so
the all-reduced rows line up. The all-reduces run in one order on every rank
(lookups by sharding type, then kernels, then table name), so they cannot
deadlock.

The kernel receives ids after input distribution: global ids for table-wise
and data-parallel shards, shard-local ids for row-wise shards, which index the
local weights directly. For a kernel with two features on tables ``a`` and
``b`` and a batch of two::

    keys = [f_a, f_b]   values = [3, 7, 1, 4, 5]   offset_per_key = [0, 2, 5]
    rows fake-quantized this step: a[[3, 7]], b[[1, 4, 5]]

Example::

    built = build(cfg, env)
    qat = enable_embedding_qat(built.model, bits={"t_cat_0": 4, "t_cat_1": 8})
    ...                 # train and evaluate as usual
    qat.remove()
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    DenseTableBatchedEmbeddingBagsCodegen,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.fake_quant import check_bits, fake_quantize_columns, fake_quantize_rows
from compression.row_range import check_range, clamp_rows, fit_row_range
from sharding.collectives import all_min, all_sum

# Shards holding a slice of each row's columns: serving's per-row min/max spans
# columns other ranks may hold.
_COLUMN_SLICED = {
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.GRID_SHARD.value,
}


# The column slices of one table's rows (table name, first row): they share a
# row range, and the rows' min/max is all-reduced among the ranks holding them.
SliceKey = tuple[str, int]

# FBGEMM's training TBEs: fused (optimizer in backward) and dense (autograd grads).
_TBES = (SplitTableBatchedEmbeddingBagsCodegen, DenseTableBatchedEmbeddingBagsCodegen)


class LookupFakeQuant:
    """Swaps the rows one TBE forward looks up for their fake-quantized values, and back.

    ``weights`` are the TBE's per-table views (``split_embedding_weights()``),
    ``bits`` the format per local table (None: stays fp32), ``feature_table_map``
    the local table each of the kernel's features reads. ``slices`` names, per
    local table, the :data:`SliceKey` of a column slice (None: whole rows), and
    ``groups`` the process group of each key (None: all its slices are local).
    """

    def __init__(
        self,
        weights: list[Tensor],
        bits: list[int | None],
        feature_table_map: list[int],
        slices: list[SliceKey | None] | None = None,
        groups: dict[SliceKey, ProcessGroup | None] | None = None,
        row_range: str = "minmax",
    ) -> None:
        # .data: same storage, own version counter. FBGEMM saves its weights for
        # backward; writes through the views it hands out would fail autograd's
        # in-place check, although backward never reads the values.
        self._weights = [w.data for w in weights]
        self._bits = bits
        self._feature_table_map = feature_table_map
        self._slices = slices or [None] * len(weights)
        self._groups = groups or {}
        self._row_range = row_range
        self._saved: list[tuple[Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def swap_in(self, values: Tensor, offset_per_key: list[int]) -> None:
        assert not self._saved, "swap_in twice without restore"
        ids_per_table: dict[int, list[Tensor]] = defaultdict(list)
        for feature, table in enumerate(self._feature_table_map):
            if self._bits[table] is not None:
                start, end = offset_per_key[feature], offset_per_key[feature + 1]
                ids_per_table[table].append(values[start:end])
        masters: dict[int, tuple[Tensor, Tensor]] = {}
        for table, chunks in ids_per_table.items():
            # Repeated ids are kept (no torch.unique, a device sync on CUDA): their
            # saved and quantized rows are equal, so repeated writes agree.
            ids = torch.cat(chunks).long()
            if ids.numel() > 0:
                masters[table] = (ids, self._weights[table].index_select(0, ids))
        ranges = self._row_ranges(masters)
        if self._row_range == "mse":
            ranges = self._fitted_ranges(masters, ranges)
        for table, (ids, master) in masters.items():
            bits, key = self._bits[table], self._slices[table]
            if key is None:
                served = fake_quantize_rows(master, bits, row_range=self._row_range)
            else:
                lo, hi = ranges[key]
                cols = clamp_rows(master, lo, hi) if self._row_range == "mse" else master
                served = fake_quantize_columns(cols, lo, hi, bits=bits)
            weight = self._weights[table]
            weight.index_copy_(0, ids, served)
            self._saved.append((weight, ids, master))

    def _row_ranges(self, masters: dict[int, tuple[Tensor, Tensor]]) -> dict[SliceKey, Any]:
        """Whole-row (min, max) of the looked-up rows of every column-sliced table."""
        ranges: dict[SliceKey, tuple[Tensor, Tensor]] = {}
        for table, (_ids, master) in masters.items():
            key = self._slices[table]
            if key is None:
                continue
            lo, hi = master.amin(dim=1), master.amax(dim=1)
            if key in ranges:  # another slice of the same rows on this rank: same ids
                lo, hi = torch.minimum(ranges[key][0], lo), torch.maximum(ranges[key][1], hi)
            ranges[key] = (lo, hi)
        for key in sorted(ranges):  # one order on every rank
            group = self._groups.get(key)
            if group is not None:
                lo, hi = ranges[key]
                both = torch.stack([lo, -hi])
                all_min(both, group=group)
                ranges[key] = (both[0], -both[1])
        return ranges

    def _fitted_ranges(
        self, masters: dict[int, tuple[Tensor, Tensor]], ranges: dict[SliceKey, Any]
    ) -> dict[SliceKey, Any]:
        """Whole-row fitted ``(lo, hi)`` of every column-sliced table's looked-up rows.

        The fit's per-row sums are all-reduced among the slices' ranks (and this
        rank's slices of the same rows are fitted together), so every slice gets
        the range a whole row gives.
        """
        columns: dict[SliceKey, list[Tensor]] = defaultdict(list)
        bits: dict[SliceKey, int] = {}
        for table, (_ids, master) in masters.items():
            key = self._slices[table]
            if key is not None:
                columns[key].append(master)
                bits[key] = self._bits[table]  # type: ignore[assignment]
        fitted: dict[SliceKey, Any] = {}
        for key in sorted(columns):  # one order on every rank
            group = self._groups.get(key)

            def reduce(sums: Tensor, group: ProcessGroup | None = group) -> None:
                if group is not None:
                    all_sum(sums, group=group)

            row_min, row_max = ranges[key]
            fitted[key] = fit_row_range(
                torch.cat(columns[key], dim=1),
                bits[key],
                row_min=row_min,
                row_max=row_max,
                reduce=reduce,
            )
        return fitted

    @torch.no_grad()
    def restore(self) -> None:
        for weight, ids, master in self._saved:
            weight.index_copy_(0, ids, master)
        self._saved.clear()


@dataclass
class QATHandle:
    """What :func:`enable_embedding_qat` did; ``remove()`` undoes it.

    ``bits``: every QAT table (all ranks agree); ``local_tables``: the QAT table
    shards this rank's kernels hold (a table can appear once per local shard).
    """

    bits: dict[str, int]
    local_tables: list[str] = field(default_factory=list)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def enable_embedding_qat(
    model: nn.Module, *, bits: int | dict[str, int], row_range: str = "minmax"
) -> QATHandle:
    """Fake-quantizes looked-up rows of the sharded tables; ``bits`` for all, or per table.

    Tables missing from a ``bits`` dict stay fp32. ``row_range``: each row's
    quantization range, ``"minmax"`` or ``"mse"`` (compression/row_range.py).
    Call after sharding, on every rank.
    """
    check_range(row_range)
    sharding_types = _sharding_types(model)
    bits_by_table = _bits_by_table(bits, sharding_types)
    column_sliced = sorted(t for t in bits_by_table if sharding_types[t] in _COLUMN_SLICED)
    groups = _slice_groups(model, column_sliced)
    handle = QATHandle(bits=bits_by_table)
    for kernel in _kernels(model):
        hooks = _hook_kernel(kernel, bits_by_table, groups, row_range)
        if hooks:
            handle._hooks += hooks
            handle.local_tables += [
                t.name for t in kernel.config.embedding_tables if t.name in bits_by_table
            ]
    return handle


def _kernels(model: nn.Module) -> list[BaseBatchedEmbeddingBag]:
    # The lookups sit in a plain list (ShardedEmbeddingBagCollection._lookups), so
    # model.modules() never reaches the kernels; torchrec walks the same list.
    # Resharding (update_shards) builds new lookups: enable QAT again after it.
    return [
        kernel
        for sebc in model.modules()
        if isinstance(sebc, ShardedEmbeddingBagCollection)
        for lookup in sebc._lookups
        for kernel in lookup.modules()
        if isinstance(kernel, BaseBatchedEmbeddingBag)
    ]


def _sharding_types(model: nn.Module) -> dict[str, str]:
    # From the plan, which every rank holds whole: all ranks agree on what to
    # quantize and what to refuse, whichever shards they hold locally.
    types = {
        table: ps.sharding_type
        for m in model.modules()
        if isinstance(m, ShardedEmbeddingBagCollection)
        for table, ps in m.module_sharding_plan.items()
    }
    if not types:
        raise ValueError(
            "enable_embedding_qat found no sharded EmbeddingBagCollection; call it on the "
            "model DistributedModelParallel returns (trainer.builder.model.build's built.model)"
        )
    return types


def _slice_groups(model: nn.Module, tables: list[str]) -> dict[SliceKey, ProcessGroup | None]:
    """A process group per column-sliced row block held on more than one rank.

    Made from the plan, which every rank holds whole, in one order on every rank:
    ``new_group`` is a collective of the whole world.
    """
    ranks: dict[SliceKey, set[int]] = defaultdict(set)
    for m in model.modules():
        if isinstance(m, ShardedEmbeddingBagCollection):
            for table, ps in m.module_sharding_plan.items():
                if table in tables:
                    for shard in ps.sharding_spec.shards:
                        ranks[(table, shard.shard_offsets[0])].add(shard.placement.rank())
    groups: dict[SliceKey, ProcessGroup | None] = {}
    for key in sorted(ranks):
        members = sorted(ranks[key])
        groups[key] = dist.new_group(members) if len(members) > 1 else None
    return groups


def _bits_by_table(bits: int | dict[str, int], sharding_types: dict[str, str]) -> dict[str, int]:
    if isinstance(bits, int):
        bits = dict.fromkeys(sharding_types, bits)
    unknown = sorted(set(bits) - set(sharding_types))
    if unknown:
        raise ValueError(
            f"qat bits name tables the model does not have: {unknown}; "
            f"tables are {sorted(sharding_types)}"
        )
    for table, b in bits.items():
        check_bits(b, what=f"qat bits[{table!r}]")
    return dict(bits)


def _hook_kernel(
    kernel: BaseBatchedEmbeddingBag,
    bits: dict[str, int],
    groups: dict[SliceKey, ProcessGroup | None],
    row_range: str,
) -> list[RemovableHandle]:
    tables = kernel.config.embedding_tables
    table_bits = [bits.get(t.name) for t in tables]
    if all(b is None for b in table_bits):
        return []
    _check_kernel(kernel, [t.name for t, b in zip(tables, table_bits) if b is not None])
    # The kernel's features are its tables' features in order (as torchrec builds
    # the TBE's own feature_table_map).
    feature_table_map = [i for i, t in enumerate(tables) for _ in range(t.num_features())]
    slices: list[SliceKey | None] = []
    for t in tables:
        key = (t.name, t.local_metadata.shard_offsets[0]) if t.local_metadata else None
        slices.append(key if key in groups else None)
    swap = LookupFakeQuant(
        kernel.split_embedding_weights(), table_bits, feature_table_map, slices, groups, row_range
    )

    def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        features: KeyedJaggedTensor = args[0] if args else kwargs["features"]
        assert len(features.keys()) == len(feature_table_map), "kernel features changed"
        swap.swap_in(features.values(), features.offset_per_key())

    def after(*_: Any) -> None:
        swap.restore()

    return [
        kernel.register_forward_pre_hook(before, with_kwargs=True),
        # always_call: a forward that raises must still give the master rows back.
        kernel.register_forward_hook(after, always_call=True),
    ]


def _check_kernel(kernel: BaseBatchedEmbeddingBag, names: list[str]) -> None:
    tbe = kernel.emb_module
    if not isinstance(tbe, _TBES):
        raise NotImplementedError(
            f"qat on tables {names}: kernel {type(kernel).__name__} ({type(tbe).__name__}) "
            f"does not hold plain per-table weights; use sharding.compute_kernel=fused or dense"
        )
    cache = getattr(tbe, "lxu_cache_weights", None)
    if cache is not None and cache.numel() > 0:
        raise NotImplementedError(
            f"qat on tables {names}: their kernel caches rows (UVM caching), and writes to "
            f"the backing weights would not reach the cache; use sharding.compute_kernel=fused"
        )
    dtypes = {w.dtype for w in kernel.split_embedding_weights()}
    if dtypes != {torch.float32}:
        raise NotImplementedError(
            f"qat on tables {names} needs fp32 tables, the kernel holds "
            f"{sorted(map(str, dtypes))}: 16-bit tables would round the fake-quantized "
            f"rows again, so training would not see the served values; keep tables fp32"
        )
