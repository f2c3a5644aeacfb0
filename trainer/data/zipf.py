"""Zipf-distributed ids for a set of embedding tables, drawn from given uniforms.

Rank ``r`` (0-based) of a table with ``cardinality`` rows has probability
proportional to ``(r + 1) ** -exponent``. Sampling inverts the cumulative
distribution, for all tables at once: table ``f``'s normalised cumulative
distribution is shifted to ``(f, f + 1]`` and the tables are concatenated, so a
uniform ``u`` for table ``f`` is looked up as ``f + u``. The lookup is
``torch.searchsorted`` on a GPU; on a CPU, where a binary search over megabytes
misses the cache at every level, the continuous law's inverse guesses the rank
and one comparison with the two CDF entries around it confirms it (over 98% of
draws; the rest are searched), which gives exactly the binary search's answer.
The cumulative table is exact for the first ``EXACT_RANKS`` ranks; the tail of
larger tables inverts the integral of ``x ** -exponent``, so any cardinality
costs at most a few MB.

Ranks are then scattered over the id space by a fixed affine bijection per
table, ``id = (a * rank + b) mod cardinality``, so that the hottest rows are not
ids 0, 1, 2: a row-wise shard holding the first block of ids would otherwise
take most of the lookups.

Example::

    tables = ZipfTables([1000, 50], exponent=1.2, seed=0)
    which = torch.tensor([0, 0, 1])                  # table of each column
    u = torch.rand(8, 3, dtype=torch.float64)        # [samples, columns]
    ranks = tables.ranks(u, which)                   # int64, rank 0 is the hottest
    ids = tables.ids(ranks, which)                   # int64 in [0, cardinality)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from trainer.data.rng import mix64_int, stream_key

EXACT_RANKS = 1 << 16
# ``ZipfTables.draw``'s tail indices when no table has a tail.
_NO_TAIL = torch.zeros(0, dtype=torch.int64)
# Rank at which the guess of ``ZipfTables._search`` is fitted to the exact CDF.
ANCHOR_RANK = 1024


class SearchConstants(NamedTuple):
    """What a compiled rank search needs (``trainer.data.slot_draw``), as numpy
    views of the CPU tables: ``padded_cdf`` and the per-table starts, last head
    offsets and head lengths, the continuous guess's float64 affine step and
    power (``integer_power``: that power when it is an integer, else 0), and
    the uniform above which a table's draw falls in its tail."""

    padded_cdf: np.ndarray
    starts: np.ndarray
    head_last: np.ndarray
    head_lengths: np.ndarray
    guess_offsets: np.ndarray
    guess_masses: np.ndarray
    log_guess: bool
    inverse_power: float
    integer_power: int
    tail_fractions: np.ndarray
    any_tail: bool


class ZipfTables:
    """Inverse-CDF sampler of frequency ranks plus the rank -> id bijections.

    ``ranks`` and ``ids`` take a ``tables`` index tensor that broadcasts
    against their input and names each element's table.
    """

    def __init__(self, cardinalities: list[int], *, exponent: float, seed: int) -> None:
        self.cardinalities = list(cardinalities)
        self.exponent = exponent
        head_lengths = [min(c, EXACT_RANKS) for c in cardinalities]
        head_weights = [
            torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent) for n in head_lengths
        ]
        head_masses = [float(w.sum()) for w in head_weights]
        tail_masses = [
            self._integral(n + 0.5, c + 0.5)
            for n, c in zip(head_lengths, cardinalities, strict=True)
        ]
        total_masses = [h + t for h, t in zip(head_masses, tail_masses, strict=True)]
        self._head_probabilities = [w / m for w, m in zip(head_weights, total_masses, strict=True)]
        shifted_cdf = torch.cat(
            [f + torch.cumsum(p, 0) for f, p in enumerate(self._head_probabilities)]
        )
        # Padded with -inf and +inf: position p + 1 holds the CDF's entry p, so the
        # entry p lies between padded[p] (the one before) and padded[p + 1].
        infinity = torch.tensor([math.inf], dtype=torch.float64)
        self._padded_cdf = torch.cat([-infinity, shifted_cdf, infinity])

        def as_tensor(values: list[float] | list[int]) -> torch.Tensor:
            return torch.tensor(
                values, dtype=torch.float64 if isinstance(values[0], float) else torch.int64
            )

        self._head_lengths = as_tensor(head_lengths)
        self._starts = self._head_lengths.cumsum(0) - self._head_lengths
        self._head_fractions = as_tensor(
            [h / m for h, m in zip(head_masses, total_masses, strict=True)]
        )
        self._total_masses = as_tensor(total_masses)
        self._has_tail = torch.tensor([t > 0.0 for t in tail_masses])
        self._any_tail = any(t > 0.0 for t in tail_masses)
        bijections = [
            _affine_bijection(c, stream_key(seed, "id_bijection", f))
            for f, c in enumerate(cardinalities)
        ]
        self._multipliers = as_tensor([m for m, _ in bijections])
        self._offsets = as_tensor([b for _, b in bijections])
        self._cardinalities = as_tensor(cardinalities)
        # The continuous law's inverse guesses a rank that one comparison with the
        # CDF confirms (see ``_search``): sum_{k<=n} k^-s ~= offset + G(n + 1/2),
        # the offset fitted at rank ANCHOR_RANK (or the table's last tabulated rank).
        self._head_lengths32 = self._head_lengths.to(torch.float32)
        self._head_last = self._head_lengths - 1
        self._zero32 = torch.zeros((), dtype=torch.float32)
        # Uniforms above this fall in the tail: 2 (above any uniform) without one.
        self._tail_fractions = torch.where(self._has_tail, self._head_fractions, 2.0)
        anchors = torch.clamp(self._head_lengths, max=ANCHOR_RANK) - 1
        anchor_cdf = shifted_cdf[self._starts + anchors] - torch.arange(len(cardinalities))
        self._guess_offsets = anchor_cdf * self._total_masses - self._antiderivative(
            anchors.to(torch.float64) + 1.5
        )
        # The guess's affine step with (1 - s) folded in (see ``_search``).
        fold = 1.0 if exponent == 1.0 else 1.0 - exponent
        self._guess_masses32 = (self._total_masses * fold).to(torch.float32)
        self._guess_offsets32 = (-self._guess_offsets * fold).to(torch.float32)

    def _integral(self, lo: float, hi: float) -> float:
        if hi <= lo:
            return 0.0
        s = self.exponent
        if s == 1.0:
            return math.log(hi / lo)
        return (hi ** (1.0 - s) - lo ** (1.0 - s)) / (1.0 - s)

    def _antiderivative(self, x: torch.Tensor) -> torch.Tensor:
        s = self.exponent
        return x.log() if s == 1.0 else x.pow(1.0 - s) / (1.0 - s)

    def to(self, device: torch.device | str) -> ZipfTables:
        """Moves the sampling tables to ``device`` (in place; ``head_probabilities``
        stay on the CPU, they are read once at set-up); returns ``self``."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def head_probabilities(self, table: int) -> torch.Tensor:
        """Probabilities of the exactly tabulated ranks (all ranks of small tables)."""
        return self._head_probabilities[table]

    def ranks(self, u: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Maps float64 uniforms in (0, 1) of the given tables to int64 ranks."""
        return self.draw(u, tables)[0]

    def draw(
        self, u: torch.Tensor, tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``ranks(u, tables)``, plus what per-rank lookups need: each rank's head
        position (its index in the concatenated tabulated heads, where
        ``trainer.data.planted`` keeps per-row effects; a tail rank's is its table's
        last tabulated rank) and, on a CPU, the flat indices of the tail ranks
        (``None`` on other devices, where callers compute the tail everywhere)."""
        shifted = u + tables.to(torch.float64)
        if u.device.type == "cpu":
            positions = self._search(u, shifted, tables)
        else:  # a GPU's binary search is fast and needs no host sync
            positions = torch.searchsorted(self._padded_cdf, shifted.reshape(-1)) - 1
            positions = positions.view(shifted.shape)
        # Past the last tabulated rank: float rounding, or the tail of a huge table.
        starts = self._starts[tables]
        head = torch.clamp(positions, starts, starts + self._head_last[tables])
        ranks = head - starts
        if not self._any_tail:  # every table tabulated whole: no tail, no host sync
            return ranks, head, _NO_TAIL if u.device.type == "cpu" else None
        if u.device.type != "cpu":
            # No host sync, no data-dependent shapes: compute the tail everywhere.
            in_tail = self._has_tail[tables] & (u > self._head_fractions[tables])
            tail = self.tail_ranks(u, tables.expand_as(ranks))
            return torch.where(in_tail, tail, ranks), head, None
        # Tables without a tail have a fraction above any uniform: one comparison.
        at = flat_nonzero(u > self._tail_fractions[tables])
        if at.numel():
            tail = self.tail_ranks(u.reshape(-1)[at], broadcast_take(tables, u.shape, at))
            ranks.view(-1).index_copy_(0, at, tail)
        return ranks, head, at

    def search_constants(self) -> SearchConstants:
        """The CPU tables and the guess's constants for a compiled ``_search``
        (the guess in float64: any guess gives the same, checked answer)."""
        s = self.exponent
        fold = 1.0 if s == 1.0 else 1.0 - s
        inverse = 0.0 if s == 1.0 else 1.0 / (1.0 - s)
        integer = round(inverse) if abs(inverse) <= 64 else 0  # e.g. -5 for exponent 1.2
        return SearchConstants(
            padded_cdf=self._padded_cdf.numpy(),
            starts=self._starts.numpy(),
            head_last=self._head_last.numpy(),
            head_lengths=self._head_lengths.to(torch.float64).numpy(),
            guess_offsets=(-self._guess_offsets * fold).numpy(),
            guess_masses=(self._total_masses * fold).numpy(),
            log_guess=s == 1.0,
            inverse_power=inverse,
            integer_power=integer if integer != 0 and abs(inverse - integer) < 1e-9 else 0,
            tail_fractions=self._tail_fractions.numpy(),
            any_tail=self._any_tail,
        )

    def _search(self, u: torch.Tensor, shifted: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``torch.searchsorted`` of ``shifted`` in the concatenated CDFs, exactly, in
        a few passes instead of a binary search per element.

        On a CPU a binary search over the CDFs (megabytes) misses the cache at
        every level for the tail ranks. Here the continuous law's inverse guesses
        the rank, and one comparison with the two CDF entries around it confirms
        it: ``padded[p] < shifted <= padded[p + 1]`` holds for exactly one ``p``,
        the binary search's answer. The rare miss (tiny tables, rounding at an
        entry) is searched the usual way. The guess is only a guess: how it is
        rounded changes how often it misses, never the answer.
        """
        s = self.exponent
        # In float32: half the bytes per pass, and the guess misses barely more often
        # (0.84% of the draws instead of 0.74% for the multi-hot bench shape).
        scaled = torch.addcmul(
            self._guess_offsets32[tables], u.to(torch.float32), self._guess_masses32[tables]
        )
        if s == 1.0:
            n = scaled.exp_()
        else:
            # G^-1(t) = ((1 - s) t)^(1 / (1 - s)), through exp/log (cheaper than pow),
            # with (1 - s) folded into the per-table constants. A negative argument
            # (past the continuum's reach) becomes 0: log gives -inf, not NaN.
            n = scaled.clamp_(min=0.0).log_().mul_(1.0 / (1.0 - s)).exp_()
        # n + 1/2 ids cover the target: the first rank reaching it is ceil(n - 1/2) - 1;
        # up to one past the last tabulated rank (where u falls in the tail).
        guess = torch.clamp(n.sub_(1.5).ceil_(), self._zero32, self._head_lengths32[tables])
        positions = guess.to(torch.int64).add_(self._starts[tables])
        flat, wanted = positions.view(-1), shifted.reshape(-1)
        # index_select: several times faster than take() or [] on a 1-D gather; the
        # entry after p is read through a view shifted by one (no index + 1 pass).
        missed = self._padded_cdf.index_select(0, flat) >= wanted
        missed |= wanted > self._padded_cdf[1:].index_select(0, flat)
        at = flat_nonzero(missed)
        if at.numel():
            found = torch.searchsorted(self._padded_cdf, wanted.index_select(0, at)) - 1
            flat.index_copy_(0, at, found)
        return positions

    def tail_ranks(self, u: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Ranks past the tabulated head of the uniforms ``u`` (each above its
        table's head fraction) of tables ``tables`` (same shape)."""
        s, lo = self.exponent, self._head_lengths[tables].to(torch.float64) + 0.5
        mass = (u - self._head_fractions[tables]) * self._total_masses[tables]
        if s == 1.0:
            x = lo * torch.exp(mass)
        else:
            x = (lo ** (1.0 - s) + (1.0 - s) * mass).clamp(min=0.0).pow(1.0 / (1.0 - s))
        # x is a 1-based rank on the continuum; round to the nearest integer rank.
        one_based = torch.floor(x + 0.5).to(torch.int64)
        one_based = torch.maximum(one_based, self._head_lengths[tables] + 1)
        return torch.minimum(one_based, self._cardinalities[tables]) - 1

    def bijections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each table's ``(multiplier, offset, cardinality)`` of :meth:`ids` (int64)."""
        return self._multipliers, self._offsets, self._cardinalities

    def ids(self, ranks: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Scatters ranks over ``[0, cardinality)`` with each table's fixed bijection."""
        ids = ranks * self._multipliers[tables]  # then in place: no fresh temporaries
        return ids.add_(self._offsets[tables]).remainder_(self._cardinalities[tables])


def _affine_bijection(cardinality: int, key: int) -> tuple[int, int]:
    """A multiplier coprime to ``cardinality`` and an offset, both from ``key``."""
    if cardinality == 1:
        return 1, 0
    h = mix64_int(key & ((1 << 64) - 1))
    offset = h % cardinality
    multiplier = 1 + (h >> 20) % (cardinality - 1)
    while math.gcd(multiplier, cardinality) != 1:
        multiplier = multiplier % (cardinality - 1) + 1
    return multiplier, offset


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the set elements: one pass that also counts them, where
    ``mask.any()`` and each ``x[mask]`` would be a pass (and a nonzero) apiece."""
    return mask.view(-1).nonzero().squeeze(1)


def broadcast_take(tables: torch.Tensor, shape: torch.Size, at: torch.Tensor) -> torch.Tensor:
    """The element of ``tables`` (broadcast to ``shape``) at each flat index ``at``."""
    if tables.dim() == 1 and tables.numel() == shape[-1]:  # one per column
        return tables.index_select(0, at % shape[-1])
    return tables.expand(shape).reshape(-1).index_select(0, at)
