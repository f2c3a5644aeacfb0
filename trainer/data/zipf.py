"""Zipf-distributed ids for a set of embedding tables, drawn from given uniforms.

Rank ``r`` (0-based) of a table with ``cardinality`` rows has probability
proportional to ``(r + 1) ** -exponent``. Sampling inverts the cumulative
distribution with one ``torch.searchsorted`` for all tables: table ``f``'s
normalised cumulative distribution is shifted to ``(f, f + 1]`` and the tables
are concatenated, so a uniform ``u`` for table ``f`` is looked up as ``f + u``.
The cumulative table is exact for the first ``EXACT_RANKS`` ranks; the tail of
larger tables inverts the integral of ``x ** -exponent``, so any cardinality
costs at most a few MB.

Ranks are then scattered over the id space by a fixed affine bijection per
table, ``id = (a * rank + b) mod cardinality``, so that the hottest rows are not
ids 0, 1, 2: a row-wise shard holding the first block of ids would otherwise
take most of the lookups.

Example::

    tables = ZipfTables([1000, 50], exponent=1.05, seed=0)
    u = torch.rand(8, 2, 1, dtype=torch.float64)   # [samples, tables, slots]
    ranks = tables.ranks(u)                        # int64, rank 0 is the hottest
    ids = tables.ids(ranks)                        # int64 in [0, cardinality)
"""

from __future__ import annotations

import math

import torch

from trainer.data.rng import mix64_int, stream_key

EXACT_RANKS = 1 << 20


class ZipfTables:
    """Inverse-CDF sampler of frequency ranks plus the rank -> id bijections.

    Tensors passed in and out have the table index on dimension 1.
    """

    def __init__(self, cardinalities: list[int], *, exponent: float, seed: int) -> None:
        self.cardinalities = list(cardinalities)
        self.exponent = exponent
        self._head_lengths = [min(c, EXACT_RANKS) for c in cardinalities]
        head_weights = [
            torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent) for n in self._head_lengths
        ]
        head_masses = [float(w.sum()) for w in head_weights]
        tail_masses = [
            self._integral(n + 0.5, c + 0.5)
            for n, c in zip(self._head_lengths, cardinalities, strict=True)
        ]
        self._total_masses = [h + t for h, t in zip(head_masses, tail_masses, strict=True)]
        self._head_probabilities = [
            w / m for w, m in zip(head_weights, self._total_masses, strict=True)
        ]
        self._head_fractions = torch.tensor(
            [h / m for h, m in zip(head_masses, self._total_masses, strict=True)],
            dtype=torch.float64,
        )
        self._shifted_cdf = torch.cat(
            [f + torch.cumsum(p, 0) for f, p in enumerate(self._head_probabilities)]
        )
        self._starts = torch.tensor([0, *self._head_lengths[:-1]]).cumsum(0)
        self._tail_tables = [f for f, t in enumerate(tail_masses) if t > 0.0]
        bijections = [
            _affine_bijection(c, stream_key(seed, "id_bijection", f))
            for f, c in enumerate(cardinalities)
        ]
        self._multipliers = torch.tensor([m for m, _ in bijections], dtype=torch.int64)
        self._offsets = torch.tensor([b for _, b in bijections], dtype=torch.int64)
        self._cardinality_tensor = torch.tensor(cardinalities, dtype=torch.int64)

    def _integral(self, lo: float, hi: float) -> float:
        if hi <= lo:
            return 0.0
        s = self.exponent
        if s == 1.0:
            return math.log(hi / lo)
        return (hi ** (1.0 - s) - lo ** (1.0 - s)) / (1.0 - s)

    def head_probabilities(self, table: int) -> torch.Tensor:
        """Probabilities of the exactly tabulated ranks (all ranks of small tables)."""
        return self._head_probabilities[table]

    def ranks(self, u: torch.Tensor) -> torch.Tensor:
        """Maps float64 uniforms in (0, 1), shaped ``[n, num_tables, ...]``, to int64 ranks."""
        table_shape = (1, -1) + (1,) * (u.dim() - 2)
        tables = torch.arange(len(self.cardinalities), dtype=torch.float64).view(table_shape)
        positions = torch.searchsorted(self._shifted_cdf, (u + tables).reshape(-1)).view(u.shape)
        ranks = positions - self._starts.view(table_shape)
        # Past the last tabulated rank: float rounding, or the tail of a huge table.
        ranks = torch.minimum(ranks, torch.tensor(self._head_lengths).view(table_shape) - 1).clamp_(
            min=0
        )
        for f in self._tail_tables:
            u_f = u[:, f]
            in_tail = u_f > self._head_fractions[f]
            tail_mass = (u_f - self._head_fractions[f]) * self._total_masses[f]
            ranks[:, f] = torch.where(in_tail, self._tail_ranks(f, tail_mass), ranks[:, f])
        return ranks

    def _tail_ranks(self, table: int, mass: torch.Tensor) -> torch.Tensor:
        s, lo = self.exponent, self._head_lengths[table] + 0.5
        if s == 1.0:
            x = lo * torch.exp(mass)
        else:
            x = (lo ** (1.0 - s) + (1.0 - s) * mass).clamp(min=0.0).pow(1.0 / (1.0 - s))
        # x is a 1-based rank on the continuum; round to the nearest integer rank.
        one_based = torch.floor(x + 0.5).clamp(
            self._head_lengths[table] + 1, self.cardinalities[table]
        )
        return one_based.to(torch.int64) - 1

    def ids(self, ranks: torch.Tensor) -> torch.Tensor:
        """Scatters ranks over ``[0, cardinality)`` with each table's fixed bijection."""
        shape = (1, -1) + (1,) * (ranks.dim() - 2)
        return (
            ranks * self._multipliers.view(shape) + self._offsets.view(shape)
        ) % self._cardinality_tensor.view(shape)


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
