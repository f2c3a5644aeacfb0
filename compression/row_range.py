"""Per-row quantization ranges: FBGEMM's min/max, or fitted to the row's rounding error.

FBGEMM's row-wise formats store one fp16 scale and one fp16 bias per row, and
the serving kernel reads a row back as ``scale * code + bias`` whatever they
are. FBGEMM's quantizer takes them from the row's minimum and maximum
(``range="minmax"``): the extremes are served exactly, but at 2 bits (four
levels) one outlying element stretches the grid and every other element rounds
coarsely. ``range="mse"`` fits the range ``[lo, hi]`` that minimises the row's
squared rounding error instead (a few Lloyd steps of a uniform quantizer: round
to the grid, then refit bias and scale by least squares), kept inside
``[min, max]``.

Any ``[lo, hi]`` inside ``[min, max]`` reaches FBGEMM's own quantizer through
the fp32 row alone: clamping the row to ``[lo, hi]`` makes ``lo`` its minimum
and ``hi`` its maximum, and rounding a clamped element is rounding the element
and clamping its code. So the QAT forward and the export both quantize the
clamped rows with FBGEMM's unchanged op, and agree bit for bit.

A column-sliced row (column-wise shards) is fitted from sums over its columns
(count, codes, codes², values, values·codes, in float64), which add up across
slices: ``reduce`` all-reduces them among the ranks holding the row's other
columns, so every slice gets the whole row's range. (float64 sums of fp32
values and small integer codes are exact unless a row's values span more than
about 2^29 in magnitude; then the sliced and the whole-row fit can differ in
the last bit.)

Example::

    lo, hi = fit_row_range(rows, bits=2)       # (num_rows,) each
    served = fake_quantize_rows(clamp_rows(rows, lo, hi), bits=2)
    # the same: fake_quantize_rows(clamp_to_fitted(rows, 2), 2)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from compression.names import RANGES

# Lloyd steps of the fit: the rounding error stops falling after about three
# (measured on trained dim-16 rows at 2 bits: 31% below min/max after 3 steps,
# 32% after 8).
FIT_STEPS = 3

# All-reduces (SUM) a (k, num_rows) float64 tensor of per-row sums in place.
Reduce = Callable[[Tensor], None]


def check_range(range_: str) -> None:
    if range_ not in RANGES:
        raise ValueError(f"qat.range={range_!r} is not a row range; use one of {RANGES}")


@torch.no_grad()
def fit_row_range(
    rows: Tensor,
    bits: int,
    *,
    row_min: Tensor | None = None,
    row_max: Tensor | None = None,
    reduce: Reduce | None = None,
    steps: int = FIT_STEPS,
) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per row, ``min <= lo <= hi <= max``, fitted to minimise rounding error.

    ``rows`` is ``(num_rows, width)``. For column slices pass the whole rows'
    ``row_min``/``row_max`` and a ``reduce`` that sums across the slices.
    """
    levels = 2**bits - 1
    x = rows.double()
    lo = (x.amin(dim=1) if row_min is None else row_min).double()
    hi = (x.amax(dim=1) if row_max is None else row_max).double()
    row_lo, row_hi = lo, hi
    count = torch.full_like(lo, x.shape[1])
    one = torch.ones_like(lo)
    for _ in range(steps):
        scale = hi - lo
        scale = torch.where(scale > 0, scale / levels, one)
        codes = ((x - lo[:, None]) / scale[:, None]).round_().clamp_(0, levels)
        sums = torch.stack(
            [count, codes.sum(1), (codes * codes).sum(1), x.sum(1), (x * codes).sum(1)]
        )
        if reduce is not None:
            reduce(sums)
        n, sc, scc, sx, sxc = sums
        spread = n * scc - sc * sc  # n^2 var(codes): 0 when every element has one code
        fit_scale = (n * sxc - sc * sx) / torch.where(spread > 0, spread, one)
        fit_bias = (sx - fit_scale * sc) / n
        ok = (spread > 0) & (fit_scale > 0)
        lo = torch.where(ok, torch.maximum(fit_bias, row_lo), lo)
        hi = torch.where(ok, torch.minimum(fit_bias + levels * fit_scale, row_hi), hi)
        hi = torch.maximum(hi, lo)
    return lo.to(rows.dtype), hi.to(rows.dtype)


def clamp_rows(rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Each row clamped to its ``[lo, hi]``: FBGEMM's min/max quantizer then uses that range."""
    return torch.minimum(torch.maximum(rows, lo[:, None]), hi[:, None])


def clamp_to_fitted(rows: Tensor, bits: int) -> Tensor:
    """Whole rows clamped to their :func:`fit_row_range` ranges."""
    return clamp_rows(rows, *fit_row_range(rows, bits))
