"""One dense-parameter budget over all the low-rank layers (``lowrank_dense.allocate=global``).

``allocate=per_layer`` gives every Linear the same share (``fraction`` of its own
weights). On a DLRM that starves the small layers: at 0.25 the bottom MLP's
``[13 -> 64]`` gets rank 2 and ``[64 -> 16]`` rank 3 (the dense features' vector
in a 3-dim subspace), while the top MLP's ``[367 -> 64]`` holds 85% of the
weights. ``global`` spends one budget, ``fraction`` of all the dense and over
parameters (weights and biases, the logit layer included, as ``dense_report``
counts them), where it keeps the most: every factorizable layer starts at rank 1,
then the next component goes, one at a time, to the layer whose next singular
value keeps the largest share of its layer's squared singular values per weight
it costs (``s_k^2 / sum s^2 / (in + out)``) and still fits. A layer is never given a
rank that would not save (``r (in + out) >= in out``); one that no rank shrinks
(the logit layer) stays dense and is paid for first.

The spectra are the trained weights' at the SVD swap (``mode=svd``); with
``mode=from_start`` there is none yet, so each layer's spectrum is taken flat
(every component ``1 / min(in, out)``): the small layers fill up first and the
rest goes to the largest.

Example::

    ranks = allocate_ranks([(13, 64, True), (367, 64, True), (32, 1, True)], fraction=0.25)
    ranks == [10, 12, 0]  # the logit layer stays dense (0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Shape = tuple[int, int, bool]  # (in_features, out_features, has bias)


def max_saving_rank(in_features: int, out_features: int) -> int:
    """The largest rank that stores fewer weights than the dense layer (0: none does)."""
    return max(0, (in_features * out_features - 1) // (in_features + out_features))


class FractionTooSmall(ValueError):
    """``lowrank_dense.fraction`` below what rank 1 in every layer needs (``allocate=global``)."""


def _full_and_rank_one(shapes: Sequence[Shape]) -> tuple[int, int]:
    """Parameters of the dense layers, and of rank 1 in each layer that saves by it."""
    full = sum(i * o + (o if b else 0) for i, o, b in shapes)
    need = sum((o if b else 0) + (i + o if max_saving_rank(i, o) else i * o) for i, o, b in shapes)
    return full, need


def check_fraction(shapes: Sequence[Shape], fraction: float) -> None:
    """Raise :class:`FractionTooSmall` unless rank 1 in every layer fits ``fraction``."""
    _check(fraction, *_full_and_rank_one(shapes))


def _check(fraction: float, full: int, need: int) -> None:
    if need > fraction * full:
        raise FractionTooSmall(
            f"lowrank_dense.fraction={fraction} keeps {int(fraction * full)} of {full} dense "
            f"parameters, below the {need} that rank 1 in every layer needs; raise it to at "
            f"least {need / full:.3f} (or use lowrank_dense.allocate=per_layer)"
        )


def _shares(spectrum: Tensor | None, n: int) -> list[float]:
    if spectrum is None:
        return [1.0 / n] * n
    s2 = spectrum.detach().double() ** 2
    return (s2 / s2.sum().clamp(min=torch.finfo(s2.dtype).tiny)).tolist()


def allocate_ranks(
    shapes: Sequence[Shape],
    *,
    fraction: float,
    spectra: Sequence[Tensor | None] | None = None,
) -> list[int]:
    """The rank of each layer (0: stays dense) with served parameters <= ``fraction`` of
    the dense total, greedily by share of squared singular values kept per weight
    (module docstring). ``spectra[i]``: layer ``i``'s singular values, or None (flat).

    Raises :class:`FractionTooSmall` when rank 1 everywhere does not fit.
    """
    full, spent = _full_and_rank_one(shapes)  # start: rank 1 wherever it saves
    _check(fraction, full, spent)
    spectra = list(spectra) if spectra is not None else [None] * len(shapes)
    budget = fraction * full
    ranks = [1 if max_saving_rank(i, o) else 0 for i, o, _ in shapes]
    shares = [_shares(s, min(i, o)) for (i, o, _), s in zip(shapes, spectra)]
    while True:
        best, pick = -1.0, -1
        for n, ((i, o, _), r) in enumerate(zip(shapes, ranks)):
            if 0 < r < max_saving_rank(i, o) and spent + i + o <= budget:
                gain = shares[n][r] / (i + o)
                if gain > best:
                    best, pick = gain, n
        if pick < 0:
            return ranks
        i, o, _ = shapes[pick]
        ranks[pick] += 1
        spent += i + o
