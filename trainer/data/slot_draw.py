"""The synthetic sample's bag slots, hashed and Zipf-searched in one compiled pass (CPU).

``SyntheticSource`` draws every slot's rank in stages, each a whole-tensor pass:
three splitmix64 hashes (sample, feature, position in the bag; 13 passes each
on int64), the uniform, the continuous law's guess of the rank and its two CDF
checks (``ZipfTables._search``), then the head positions and the tail mask. On
a CPU those passes are most of a batch's cost (a multi-hot batch of 2,048
samples: 364k slots through ~60 passes). Here numba compiles the whole chain
into one loop over the slots, each slot's numbers kept in registers.

The answer is the staged one, bit for bit (``tests/test_slot_draw.py``): the
hashes are the same uint64 arithmetic, the uniforms the same 53 bits, and a
rank is confirmed by the same two comparisons with the CDF (the binary search's
answer; a guess only changes how often the search runs). Tail ranks of huge
tables (past ``zipf.EXACT_RANKS``) are left to ``ZipfTables``, which computes
them in torch on the few slots that need them, so their float64 ``pow`` is the
staged one too.

The dense features go the same way (:func:`dense_normals`): the loop hashes and
makes the two uniforms of each normal, torch's ``log``, ``sqrt`` and ``cos``
finish them as ``rng.normal`` does. So do the ids of the ranks (:func:`slot_ids`).

Without numba (``import numba`` fails) ``draw_slots`` returns ``None`` and
``slot_ranks`` draws in stages. numba compiles once per machine (about 1 s) and keeps
the machine code in ``__pycache__`` (``cache=True``); a process that draws
large batches imports numba (0.17 s, about 100 MB of RSS for llvmlite).

Example::

    ranks, head, tail_at = slot_ranks(      # as ZipfTables.draw: [n, S], [n, S], flat
        tables, key, torch.arange(2048), slot_features, slot_positions,
        torch.arange(num_features), planted.per_slot,
    )
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from sharding.compiled import load_compiled
from trainer.data.rng import box_muller, hash_counters, mix64, normal, to_uniform
from trainer.data.zipf import ZipfTables

log = logging.getLogger(__name__)
# SHARDREC_FUSED_DRAW=0 draws in stages (torch ops) even where numba is installed.
ENABLED = os.environ.get("SHARDREC_FUSED_DRAW", "1") != "0"
# Below this many slots the staged draw is as fast, and a process spares importing numba.
MIN_SLOTS = 1 << 14

_kernel = None  # the compiled loops, once imported (False: numba is missing)


def slot_ranks(
    tables: ZipfTables,
    key: int,
    indices: torch.Tensor,
    slot_features: torch.Tensor,
    slot_positions: torch.Tensor,
    feature_columns: torch.Tensor,
    per_slot: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``ZipfTables.draw``'s ranks, head positions and tail indices of the slots of
    the samples ``indices``: by the compiled loop where it runs (``draw_slots``),
    else in stages, the same bits. ``feature_columns``: ``arange(F)`` on the
    samples' device; ``per_slot``: spreads ``[n, F]`` over the ``[n, S]`` slots
    (``PlantedModel.per_slot``; ``None`` when every bag holds one id)."""
    fused = draw_slots(tables, key, indices, slot_features, slot_positions)
    if fused is not None:
        return fused
    # The hash is the chain (sample, feature, position); its per-feature stage runs
    # on [n, F] and is then repeated over the bag, the same bits as hashing every slot.
    per_feature = mix64(hash_counters(key, indices.unsqueeze(1)) ^ feature_columns)
    spread = per_feature if per_slot is None else per_slot(per_feature)
    return tables.draw(to_uniform(mix64(spread ^ slot_positions)), slot_features)


def draw_slots(
    tables: ZipfTables,
    key: int,
    indices: torch.Tensor,
    slot_features: torch.Tensor,
    slot_positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Ranks, head positions and tail indices (``[n, S]``, ``[n, S]``, flat) of the
    samples ``indices`` (int64 ``[n]``, CPU), as ``ZipfTables.draw`` gives them
    for ``to_uniform(mix64(mix64(mix64(indices ^ key) ^ feature) ^ position))``;
    ``None`` where the fused loop is off, unavailable or not worth it."""
    n, num_slots = indices.numel(), slot_features.numel()
    if not ENABLED or indices.device.type != "cpu" or n * num_slots < MIN_SLOTS:
        return None
    kernel = _load()
    if kernel is None:
        return None
    c = tables.search_constants()
    ranks = np.empty((n, num_slots), dtype=np.int64)
    head = np.empty((n, num_slots), dtype=np.int64)
    tail_at = np.empty(n * num_slots if c.any_tail else 0, dtype=np.int64)
    tail_u = np.empty_like(tail_at, dtype=np.float64)
    count = kernel.draw(
        np.uint64(key & ((1 << 64) - 1)),
        indices.to(torch.int64).contiguous().numpy(),
        slot_features.numpy(),
        slot_positions.numpy(),
        c.padded_cdf,
        c.starts,
        c.head_last,
        c.guess_offsets,
        c.guess_masses,
        c.head_lengths,
        c.tail_fractions,
        c.log_guess,
        c.inverse_power,
        c.integer_power,
        ranks,
        head,
        tail_at,
        tail_u,
    )
    ranks_t, at = torch.from_numpy(ranks), torch.from_numpy(tail_at[:count])
    if count:  # past a huge table's tabulated head: torch's float64 pow, as staged
        tables_at = slot_features.index_select(0, at % num_slots)
        ranks_t.view(-1).index_copy_(
            0, at, tables.tail_ranks(torch.from_numpy(tail_u[:count]), tables_at)
        )
    return ranks_t, torch.from_numpy(head), at


def dense_normals(key: int, indices: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``normal(key, indices[:, None], columns)`` ``[n, C]``, its hashes and uniforms by
    the compiled loop where it runs (the torch passes otherwise), its Box-Muller in
    torch either way: the same bits."""
    kernel = _load() if ENABLED and indices.device.type == "cpu" else None
    if kernel is None or indices.numel() * columns.numel() < MIN_SLOTS // 4:
        return normal(key, indices.unsqueeze(1), columns)
    u1 = np.empty((indices.numel(), columns.numel()), dtype=np.float64)
    u2 = np.empty_like(u1)
    kernel.normal_uniforms(
        np.uint64(key & ((1 << 64) - 1)),
        indices.to(torch.int64).contiguous().numpy(),
        columns.to(torch.int64).contiguous().numpy(),
        u1,
        u2,
    )
    return box_muller(torch.from_numpy(u1), torch.from_numpy(u2))


def slot_ids(tables: ZipfTables, ranks: torch.Tensor, slot_features: torch.Tensor) -> torch.Tensor:
    """``tables.ids(ranks, slot_features)`` (``[n, S]``), by the compiled loop on a
    large CPU draw: the same integers."""
    kernel = _load() if ENABLED and ranks.device.type == "cpu" else None
    if kernel is None or ranks.numel() < MIN_SLOTS:
        return tables.ids(ranks, slot_features)
    ids = np.empty(tuple(ranks.shape), dtype=np.int64)
    multipliers, offsets, cardinalities = (t.numpy() for t in tables.bijections())
    kernel.ids(
        ranks.contiguous().numpy(), slot_features.numpy(), multipliers, offsets, cardinalities, ids
    )
    return torch.from_numpy(ids)


def fused_available() -> bool:
    """Whether large CPU draws take the compiled loop (numba installed, not turned off)."""
    return ENABLED and _load() is not None


def _load():  # noqa: ANN202 - the numba dispatchers (draw, normal_uniforms, ids), or None
    global _kernel
    if _kernel is None:
        _kernel = (
            load_compiled(
                _import_kernels,
                log=log,
                what="the compiled slot draw",
                fallback="the synthetic data is drawn in stages (the same batches, slower)",
            )
            or False
        )
    return _kernel or None


def _import_kernels() -> SimpleNamespace:
    from trainer.data.slot_draw_kernel import draw_kernel, ids_kernel, normal_uniforms_kernel

    return SimpleNamespace(draw=draw_kernel, normal_uniforms=normal_uniforms_kernel, ids=ids_kernel)
