"""How the planted model lays out its features: which pairs interact, and the
runs of equally hot (multi-hot) features that share one block of a batch (and
any slots' consecutive runs, ``contiguous_ranges``), and how a batch keeps the
first ``length`` ids of each bag without a host sync (``pack_kept``).

Example::

    pairs = select_pairs(cfg, num_features=26)   # [(2, 5), (5, 14), ...]
    hotness_runs([1, 1, 3])   # [(0, 2, 1, 0, 2), (2, 5, 3, 2, 3)]
    contiguous_ranges([1, 2, 3, 7, 8])   # [(1, 4), (7, 9)]
"""

from __future__ import annotations

import logging

import torch

from trainer.data.rng import hash_counters, stream_key
from trainer.data.synthetic_config import SyntheticDataConfig

logger = logging.getLogger(__name__)


def select_pairs(cfg: SyntheticDataConfig, num_features: int) -> list[tuple[int, int]]:
    """The ``num_interactions`` feature pairs that interact, fixed by the seed.

    A pair's features both have at most ``interaction_max_cardinality`` rows
    and one of them at most ``interaction_small_cardinality``. DLRM-style dot
    products learn an interaction from a saddle at zero, and torchrec
    initialises a table of ``n`` rows at scale ``1 / sqrt(n)``: two large
    tables start so close to the saddle that a few million samples are often
    not enough to leave it, while a small table's larger rows pull the other
    side along quickly.
    """
    cards = cfg.cardinalities
    candidates = [
        (i, j)
        for i in range(num_features)
        for j in range(i + 1, num_features)
        if max(cards[i], cards[j]) <= cfg.interaction_max_cardinality
        and min(cards[i], cards[j]) <= cfg.interaction_small_cardinality
    ]
    if cfg.num_interactions > 0 and not candidates and num_features > 1:
        # Scaled-up tables (every table above the caps): the calibration cannot
        # hold, but the data stay usable. Pair the smallest table with the next
        # smallest ones, the most learnable pairs that exist.
        by_rows = sorted(range(num_features), key=lambda f: (cards[f], f))
        smallest = by_rows[0]
        candidates = [tuple(sorted((smallest, f))) for f in by_rows[1 : 1 + cfg.num_interactions]]
        logger.warning(
            "no feature pair qualifies for the planted interactions (both at most "
            "data.interaction_max_cardinality=%d rows, one at most "
            "data.interaction_small_cardinality=%d; the smallest table has %d rows): "
            "planting %s instead, which a DLRM may learn slowly; raise those two keys "
            "to silence this",
            cfg.interaction_max_cardinality,
            cfg.interaction_small_cardinality,
            cards[smallest],
            candidates,
        )
    elif cfg.num_interactions > len(candidates):
        # Small test configs hit this; the data stay usable, with fewer pairs.
        logger.warning(
            "data.num_interactions=%d but only %d feature pairs qualify (both at most "
            "data.interaction_max_cardinality=%d rows, one at most "
            "data.interaction_small_cardinality=%d); planting %d",
            cfg.num_interactions,
            len(candidates),
            cfg.interaction_max_cardinality,
            cfg.interaction_small_cardinality,
            len(candidates),
        )
    key = stream_key(cfg.seed, "pairs")
    order = [int(hash_counters(key, i, j)) for i, j in candidates]
    chosen = sorted(range(len(candidates)), key=order.__getitem__)[: cfg.num_interactions]
    return sorted(candidates[c] for c in chosen)


def hotness_runs(hotness: list[int]) -> list[tuple[int, int, int, int, int]]:
    """Runs of consecutive features with the same hotness (ids per bag), as
    ``(first slot, end slot, hotness, first feature, end feature)``: a run's bags
    are one ``[size, features, hotness]`` block of a ``[size, num_slots]`` tensor."""
    runs: list[tuple[int, int, int, int, int]] = []
    slot = 0
    for f, h in enumerate(hotness):
        if runs and runs[-1][2] == h:
            lo, _, _, f_lo, _ = runs[-1]
            runs[-1] = (lo, slot + h, h, f_lo, f + 1)
        else:
            runs.append((slot, slot + h, h, f, f + 1))
        slot += h
    return runs


def contiguous_ranges(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slot indices as ``(start, stop)`` runs of consecutive slots:
    ``[1, 2, 3, 7, 8]`` -> ``[(1, 4), (7, 9)]``."""
    ranges: list[tuple[int, int]] = []
    for slot in slots:
        if ranges and ranges[-1][1] == slot:
            ranges[-1] = (ranges[-1][0], slot + 1)
        else:
            ranges.append((slot, slot + 1))
    return ranges


def pack_kept(values: torch.Tensor, keep: torch.Tensor, total: int) -> torch.Tensor:
    """``values[keep]`` when the number kept, ``total``, is known on the host: a
    scatter to each kept element's rank among the kept (a cumulative sum), the
    dropped ones to one spare slot past the end. No data-dependent shape, so no
    host sync on a GPU (a boolean mask needs one)."""
    destination = torch.cumsum(keep, 0).sub_(1)
    destination.masked_fill_(~keep, total)
    packed = values.new_empty(total + 1).scatter_(0, destination, values)
    return packed[:total]
