"""numba's loop for ``trainer.data.slot_draw`` (imported only where numba is installed).

One pass over ``[samples, slots]``: per sample the splitmix64 chain (sample,
then feature once per bag, then position), the 53-bit uniform, the Zipf law's
guess of the rank (with no exp/log where the law's inverse is an integer power,
as for exponent 1.2), its two CDF checks (a step or two to the neighbour, or a
binary search, when they fail: the staged ``ZipfTables._search``'s answer, bit
for bit) and the clamp into the table's tabulated head. Tail slots (uniform
above the table's head fraction) are listed with their uniforms for
``ZipfTables.tail_ranks``. A second loop gives the dense features' hashes and
Box-Muller uniforms (``rng.normal``'s, whose log and cos stay in torch), a
third the ids of the ranks (``ZipfTables.ids``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_S32, _LOW32 = np.uint64(32), np.uint64(0xFFFFFFFF)
_INV53 = 2.0**-53
_INV32 = 2.0**-32
# Steps to a neighbour of the guess before a binary search (a miss is nearly always 1 off).
_MAX_STEPS = 16


@numba.njit(inline="always")
def _mix(x):  # noqa: ANN001, ANN202 - numba infers uint64
    """splitmix64's finaliser (``trainer.data.rng.mix64``) on a uint64."""
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MUL1
    x = (x ^ (x >> _S27)) * _MUL2
    return x ^ (x >> _S31)


@numba.njit(inline="always")
def _power(x, k):  # noqa: ANN001, ANN202
    """``x ** k`` for a nonzero int ``k``, by squaring."""
    result = 1.0
    n = -k if k < 0 else k
    while n:
        if n & 1:
            result *= x
        x *= x
        n >>= 1
    return 1.0 / result if k < 0 else result


@numba.njit(inline="never")
def _search_near(padded_cdf, p, x):  # noqa: ANN001, ANN202
    """The ``p`` with ``padded_cdf[p] < x <= padded_cdf[p + 1]`` (the CDF is sorted
    and padded with -inf and +inf, so exactly one) from a guess ``p`` that missed:
    a few steps to a neighbour when it is close, else a binary search. Out of
    line: the hot loop stays a straight check (a loop inline there cost 1.5x)."""
    steps = 0
    while padded_cdf[p] >= x:
        p -= 1
        steps += 1
        if steps == _MAX_STEPS:
            return np.searchsorted(padded_cdf, x) - 1
    while x > padded_cdf[p + 1]:
        p += 1
        steps += 1
        if steps == _MAX_STEPS:
            return np.searchsorted(padded_cdf, x) - 1
    return p


@numba.njit(cache=True, nogil=True, boundscheck=False)
def draw_kernel(  # noqa: ANN201, PLR0913 - numba signature, arrays in and out
    key,  # noqa: ANN001
    indices,  # noqa: ANN001
    slot_features,  # noqa: ANN001
    slot_positions,  # noqa: ANN001
    padded_cdf,  # noqa: ANN001
    starts,  # noqa: ANN001
    head_last,  # noqa: ANN001
    guess_offsets,  # noqa: ANN001
    guess_masses,  # noqa: ANN001
    head_lengths,  # noqa: ANN001
    tail_fractions,  # noqa: ANN001
    log_guess,  # noqa: ANN001
    inverse_power,  # noqa: ANN001
    integer_power,  # noqa: ANN001
    ranks,  # noqa: ANN001
    head,  # noqa: ANN001
    tail_at,  # noqa: ANN001
    tail_u,  # noqa: ANN001
):
    """Fills ``ranks`` and ``head`` ``[n, S]``; returns how many tail slots it listed."""
    n = indices.shape[0]
    num_slots = slot_features.shape[0]
    count = 0
    for i in range(n):
        per_sample = _mix(np.uint64(indices[i]) ^ key)
        per_feature = np.uint64(0)
        previous = -1
        for j in range(num_slots):
            f = slot_features[j]
            if f != previous:  # a bag's slots are side by side: one feature hash per bag
                per_feature = _mix(per_sample ^ np.uint64(f))
                previous = f
            h = _mix(per_feature ^ np.uint64(slot_positions[j]))
            u = (np.float64(h >> _S11) + 0.5) * _INV53
            shifted = u + np.float64(f)
            scaled = guess_offsets[f] + u * guess_masses[f]
            if log_guess:  # exponent 1
                guess = math.exp(scaled)
            elif scaled <= 0.0:
                guess = 0.0
            elif integer_power != 0:  # e.g. -5 for exponent 1.2: 3 products, no exp/log
                guess = _power(scaled, integer_power)
            else:
                guess = math.exp(math.log(scaled) * inverse_power)
            guess = math.ceil(guess - 1.5)
            if not guess > 0.0:  # also NaN
                guess = 0.0
            if guess > head_lengths[f]:
                guess = head_lengths[f]
            p = np.int64(guess) + starts[f]
            if not (padded_cdf[p] < shifted and shifted <= padded_cdf[p + 1]):
                p = _search_near(padded_cdf, p, shifted)
            lo = starts[f]
            hi = lo + head_last[f]
            if p < lo:
                p = lo
            elif p > hi:
                p = hi
            head[i, j] = p
            ranks[i, j] = p - lo
            if u > tail_fractions[f]:
                tail_at[count] = i * num_slots + j
                tail_u[count] = u
                count += 1
    return count


@numba.njit(cache=True, nogil=True, boundscheck=False)
def normal_uniforms_kernel(key, indices, columns, u1, u2):  # noqa: ANN001, ANN201
    """``rng.normal(key, indices[:, None], columns)``'s two uniforms ``[n, C]``: the
    hash chain (sample, then column) and the halves of each hash, as torch makes them."""
    for i in range(indices.shape[0]):
        per_sample = _mix(np.uint64(indices[i]) ^ key)
        for j in range(columns.shape[0]):
            h = _mix(per_sample ^ np.uint64(columns[j]))
            u1[i, j] = (np.float64(h >> _S32) + 0.5) * _INV32
            u2[i, j] = (np.float64(h & _LOW32) + 0.5) * _INV32


@numba.njit(cache=True, nogil=True, boundscheck=False)
def ids_kernel(ranks, slot_features, multipliers, offsets, cardinalities, ids):  # noqa: ANN001, ANN201
    """``ZipfTables.ids``: ``(rank * multiplier + offset) % cardinality`` per slot
    ``[n, S]`` (no int64 overflow: rank and multiplier are below the cardinality)."""
    for i in range(ranks.shape[0]):
        for j in range(ranks.shape[1]):
            f = slot_features[j]
            ids[i, j] = (ranks[i, j] * multipliers[f] + offsets[f]) % cardinalities[f]
