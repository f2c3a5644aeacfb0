"""A size budget: pick one compression per table so the tables fit, with the least loss.

Each table offers candidates -- ``(choice, bytes, sensitivity)``: the bytes the
table is served in under that choice and the measured eval-loss increase when
that table alone is compressed that way (trainer/builder/budget.py measures
them). :func:`choose` solves the multiple-choice knapsack greedily by marginal
loss per byte: every table starts at its least-loss candidate; each table's
candidates are cut to their lower convex hull in (bytes, loss) (a dominated or
non-convex option is never the cheapest way to save bytes); then the step with
the smallest loss increase per byte saved is taken, table by table, until the
sum fits the budget. On convex hulls this is the exact answer of the
continuous relaxation, and within one step of the 0/1 optimum.

Loss is assumed additive over tables (each measured alone), the usual
first-order approximation of per-table sensitivity.

Example::

    candidates = {"t_a": [Candidate("int8", 8000, 0.0), Candidate("int2", 3200, 0.004)],
                  "t_b": [Candidate("int8", 900, 0.0), Candidate("int4", 500, 0.001)]}
    picked = choose(candidates, budget_bytes=5000)   # {"t_a": int2, "t_b": int8}
    print(format_choice(picked, rows={"t_a": 100, "t_b": 10}))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from compression.serving import pack_rows


@dataclass(frozen=True)
class Candidate:
    """One way to serve one table; ``settings`` is what the caller writes into its config."""

    choice: str
    bytes: int
    sensitivity: float
    settings: dict[str, Any] = field(default_factory=dict, compare=False)


@functools.cache
def row_bytes(dim: int, bits: int | None) -> int:
    """Bytes of one served row: FBGEMM's packed row (codes, fp16 scale and bias, 16-byte
    alignment) for ``bits`` 8/4/2; ``dim * 4`` for fp32 (``None``)."""
    if bits is None:
        return dim * 4
    return int(pack_rows(torch.zeros(1, dim), bits=bits).shape[1])


def _hull(options: list[Candidate]) -> list[Candidate]:
    """The lower convex hull in (bytes, sensitivity), from most bytes to fewest."""
    by_bytes = sorted(options, key=lambda c: (-c.bytes, c.sensitivity))
    frontier: list[Candidate] = []
    for c in by_bytes:  # Pareto: each smaller option must lose more
        if frontier and c.sensitivity <= frontier[-1].sensitivity:
            if c.bytes == frontier[-1].bytes:
                continue
            # Cheaper and no worse: drop the larger ones it dominates.
            while frontier and frontier[-1].sensitivity >= c.sensitivity:
                frontier.pop()
        frontier.append(c)
    hull: list[Candidate] = []
    for c in frontier:  # convexity: the loss per byte saved grows along the hull
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], c):
            hull.pop()
        hull.append(c)
    return hull


def _slope(big: Candidate, small: Candidate) -> float:
    """Loss added per byte saved going from ``big`` to ``small``."""
    return (small.sensitivity - big.sensitivity) / max(big.bytes - small.bytes, 1)


def choose(candidates: dict[str, list[Candidate]], *, budget_bytes: int) -> dict[str, Candidate]:
    """One candidate per table, total bytes <= ``budget_bytes``, least total sensitivity
    (greedy by marginal loss per byte on each table's convex hull; module docstring).

    Raises ValueError when even every table's smallest candidate does not fit.
    """
    hulls = {name: _hull(options) for name, options in candidates.items()}
    smallest = sum(min(c.bytes for c in options) for options in candidates.values())
    if smallest > budget_bytes:
        raise ValueError(
            f"the budget of {budget_bytes} bytes is below the smallest choice of every "
            f"table ({smallest} bytes); raise the budget or add smaller candidates"
        )
    at = dict.fromkeys(hulls, 0)
    total = sum(h[0].bytes for h in hulls.values())
    while total > budget_bytes:
        steps = [
            (_slope(h[at[n]], h[at[n] + 1]), n) for n, h in hulls.items() if at[n] + 1 < len(h)
        ]
        _, name = min(steps)
        h = hulls[name]
        total -= h[at[name]].bytes - h[at[name] + 1].bytes
        at[name] += 1
    picked = {name: hulls[name][i] for name, i in at.items()}
    # Bytes the last step freed beyond the need: move tables back up where it fits.
    for name in sorted(picked, key=lambda n: -len(hulls[n])):
        while at[name] > 0:
            up = hulls[name][at[name] - 1]
            extra = up.bytes - picked[name].bytes
            if total + extra > budget_bytes:
                break
            total += extra
            at[name] -= 1
            picked[name] = up
    return picked


def format_choice(
    picked: dict[str, Candidate], *, rows: dict[str, int], budget_bytes: int | None = None
) -> str:
    """The choice as a table: table, rows, choice, bytes, measured sensitivity."""
    lines = [f"{'table':<14} {'rows':>8}  {'choice':<16} {'bytes':>10}  {'sensitivity':>11}"]
    for name, c in picked.items():
        lines.append(
            f"{name:<14} {rows.get(name, 0):>8}  {c.choice:<16} {c.bytes:>10}  "
            f"{c.sensitivity:>11.5f}"
        )
    total = sum(c.bytes for c in picked.values())
    loss = sum(c.sensitivity for c in picked.values())
    budget = f" (budget {budget_bytes})" if budget_bytes is not None else ""
    lines.append(f"{'total':<14} {'':>8}  {'':<16} {total:>10}  {loss:>11.5f}{budget}")
    return "\n".join(lines)
