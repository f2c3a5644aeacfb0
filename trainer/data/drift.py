"""Days of the synthetic stream: new ids, shifting popularity, drifting effects.

With ``data.days=N`` (N > 0) the synthetic source has days ``0 .. N-1``
(``SyntheticSource(cfg, day=t)``); day 0 is exactly the fixed data set of
``data.days=0``. The Zipf law draws a *rank* per lookup as always; what a day
changes is the *catalogue*: which item (table row) holds each rank and what
each item's planted effects are. Day ``d`` is day ``d - 1`` changed three ways,
per table:

- **popularity** (``data.popularity_shift``, ``s``): every item's log-rank
  ``log(1 + rank)`` takes a step ``s * N(0, 1)`` and the items are ranked again
  (a random walk of each item's popularity);
- **new ids** (``data.new_id_share``, ``q``): ranks are taken in a random order,
  skipping those with more than ``q / 2`` of the traffic each, until their Zipf
  mass reaches ``q``; their items retire and brand-new items, on rows no day
  used before, take their places (at most ``new_ids_per_day`` a day, the rows
  every table sets aside: ``SyntheticDataConfig.table_rows``). A new item's
  effects are fresh draws, as strong as those of an item first seen at its rank;
- **effects** (``data.effect_drift``, ``δ``): each item's standardised
  first-order effect and latent vector move one AR(1) step,
  ``z' = sqrt(1 - δ²) z + δ N(0, 1)``, which keeps their spread (and so the
  click rate and the oracle AUC) while yesterday's values grow stale.

Everything is hashed from ``(seed, purpose, table, day, item)``
(``trainer.data.rng``): a day's catalogue is rebuilt at construction by
replaying the changes of days ``1 .. d`` (a few ms per day), never from any
sample, so day ``t`` is the same whichever days were drawn before. Its samples
come from streams of their own (the seed folded with the day); the planted
model's standardisation (means, gains, whiteners) stays day 0's. Every table
must be tabulated whole (at most ``zipf.EXACT_RANKS`` rows), so that a day's
catalogue is a per-rank table of rows and effects, which :func:`apply_day`
installs in the planted model's per-rank tables (its private lookups: this
module extends ``planted.py``, which stays day-free).

Example::

    cfg = SyntheticDataConfig(days=7, new_id_share=0.05)
    day3 = SyntheticSource(cfg, day=3)       # trainer.data.synthetic
    day3.oracle_auc()                        # the best AUC on day 3's eval set
    cfg.table_rows()                         # rows per table for all 7 days' ids
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from trainer.data.rng import normal, stream_key, uniform
from trainer.data.synthetic_config import new_ids_per_day

if TYPE_CHECKING:
    from trainer.data.planted import PlantedModel
    from trainer.data.synthetic_config import SyntheticDataConfig
    from trainer.data.zipf import ZipfTables

# The settings of days; left out of a one-day source's fingerprint (as before they existed).
DRIFT_KEYS = ("days", "new_id_share", "popularity_shift", "effect_drift")


def fingerprint_settings(cfg: SyntheticDataConfig, day: int) -> dict[str, Any]:
    """What a source's fingerprint hashes: its settings, and the day when there are days."""
    settings = dataclasses.asdict(cfg)
    if not cfg.days:
        for key in DRIFT_KEYS:
            settings.pop(key)
        return settings
    return {**settings, "day": day}


def check_day(cfg: SyntheticDataConfig, day: int) -> None:
    """Raises ValueError unless ``day`` is one of the source's days."""
    if not 0 <= day < max(cfg.days, 1):
        raise ValueError(
            f"day={day} is not a day of this source: data.days={cfg.days} has days "
            f"0 .. {max(cfg.days, 1) - 1}; raise data.days or ask for an earlier day"
        )


def sample_seed(seed: int, day: int) -> int:
    """The seed of day ``day``'s sample streams (dense, ids, labels): ``seed`` on day 0."""
    return seed if day == 0 else stream_key(seed, "day", day)


@dataclasses.dataclass
class TableDay:
    """One table's catalogue on a day (``rows`` = cardinality + later days' new rows)."""

    # The item (row index before the day-0 bijection) holding each rank: [cardinality].
    slot_item: torch.Tensor
    # The rank each item entered at (day 0's items: their day-0 rank): [rows]; its
    # effects' strength, 1 / (1 + rank / effect_decay_rank), as on day 0.
    entry_rank: torch.Tensor
    # Standard-normal first-order effects, before the rank decay: [rows].
    first_order: torch.Tensor
    # Latent vectors, before the rank decay ([rows, latent_dim]); None for other tables.
    latent: torch.Tensor | None


def table_day(
    cfg: SyntheticDataConfig,
    planted: PlantedModel,
    probabilities: torch.Tensor,
    *,
    table: int,
    day: int,
    latent: bool,
) -> TableDay:
    """Table ``table``'s catalogue on day ``day``, replayed from day 0.

    ``probabilities``: the table's Zipf law over its ranks (``ZipfTables.head_probabilities``);
    ``latent``: whether the table takes part in a planted interaction. Each day
    draws only for the items then in the table (effects of rows not yet used, or
    retired, are never read).
    """
    f, seed, cardinality = table, cfg.seed, cfg.cardinalities[table]
    rows = cfg.table_rows()[f]
    share, shift, drift = cfg.new_id_share, cfg.popularity_shift, cfg.effect_drift
    per_day = new_ids_per_day(cardinality, share) if cfg.days > 1 else 0
    old = torch.arange(cardinality)
    dims = torch.arange(cfg.latent_dim)
    # Day 0: the planted model's own draws (planted.py's raw effects before the decay).
    first_order = torch.zeros(rows, dtype=torch.float64)
    first_order[:cardinality] = normal(planted._first_order_key, f, old)
    vectors = None
    if latent:
        vectors = torch.zeros(rows, cfg.latent_dim, dtype=torch.float64)
        vectors[:cardinality] = normal(planted._latent_key, f, old.unsqueeze(1), dims)
    slot_item = old.clone()
    entry_rank = torch.cat([old, torch.zeros(rows - cardinality, dtype=torch.int64)])
    log_rank = torch.log1p(old.to(torch.float64))
    eligible = probabilities <= share / 2
    keep = math.sqrt(max(0.0, 1.0 - drift * drift))
    for d in range(1, day + 1):
        if drift > 0:  # yesterday's items' effects move one AR(1) step
            noise = normal(stream_key(seed, "drift_w", f, d), slot_item)
            first_order[slot_item] = keep * first_order[slot_item] + drift * noise
            if vectors is not None:
                noise = normal(stream_key(seed, "drift_v", f, d), slot_item.unsqueeze(1), dims)
                vectors[slot_item] = keep * vectors[slot_item] + drift * noise
        if shift > 0:  # each item's log-rank takes a step; rank them again
            step = normal(stream_key(seed, "popularity", f, d), slot_item)
            slot_item = slot_item[torch.argsort(log_rank + shift * step, stable=True)]
        if per_day:  # new items replace the items at ranks holding the share
            u = uniform(stream_key(seed, "new_ids", f, d), old)
            order = torch.argsort(torch.where(eligible, u, 2.0))  # eligible first, shuffled
            mass = torch.where(eligible, probabilities, 0.0)[order]
            # The prefix whose mass reaches the share (each rank counted at its midpoint),
            # of eligible ranks only: a small table's head never goes to new items.
            reach = int((torch.cumsum(mass, 0) - mass / 2 < share).sum())
            taken = min(reach, per_day, int(eligible.sum()))
            slots = order[:taken]
            entering = cardinality + (d - 1) * per_day + torch.arange(taken)
            slot_item[slots] = entering
            entry_rank[entering] = slots
            first_order[entering] = normal(stream_key(seed, "new_w"), f, entering)
            if vectors is not None:
                new_v = normal(stream_key(seed, "new_v"), f, entering.unsqueeze(1), dims)
                vectors[entering] = new_v
    return TableDay(slot_item, entry_rank, first_order, vectors)


def apply_day(
    cfg: SyntheticDataConfig,
    day: int,
    tables: ZipfTables,
    planted: PlantedModel,
    *,
    known_through: int | None = None,
) -> tuple[int, torch.Tensor | None]:
    """Installs day ``day``'s catalogue in ``planted`` (in place); returns the day's
    sample seed and its rows per rank (int64, concatenated over the tables like
    ``ZipfTables.draw``'s head positions), or ``None`` on day 0 (whose ids are
    ``ZipfTables.ids`` of the ranks, as without days).

    Each term is standardised again under the Zipf law, as day 0's is
    (planted.py), so its standard deviation stays the configured one every day.

    ``known_through=k`` (``-1 <= k < day``): the day as the end of day ``k`` tells
    it instead, the expected logit given days ``0 .. k`` (``k = day - 1``: the
    knowable oracle, the best any model trained on the earlier days can score, up
    to the difference between the expected logit and the expected probability).
    Day ``day``'s items at their ranks, each with its effects of day ``k`` moved
    by the AR(1)'s expected steps (times ``sqrt(1 - δ²)`` per day), items entering
    after day ``k`` at their prior mean (0), all standardised as on day ``k``.
    With ``k = -1`` every item is unknown: only the dense terms are left.
    """
    check_day(cfg, day)
    if known_through is None and day == 0:
        return cfg.seed, None
    if known_through is not None and not -1 <= known_through < day:
        raise ValueError(f"known_through={known_through} must be in [-1, day={day})")
    num_features = len(cfg.cardinalities)
    latent_features = planted._latent_features.tolist()
    # Days 0 .. k tell day k's values, expected day - k AR(1) steps on; none: nothing.
    known_share = 0.0
    if known_through is not None and known_through >= 0:
        known_share = (1.0 - cfg.effect_drift**2) ** ((day - known_through) / 2)
    rows, effects, vectors, means, whiteners = [], [], [], [], []
    for f, cardinality in enumerate(cfg.cardinalities):
        probabilities = tables.head_probabilities(f)
        if probabilities.numel() != cardinality:
            raise ValueError(
                f"data.cardinalities[{f}]={cardinality} is too large for data.days: a drifting "
                f"table is tabulated whole (at most {probabilities.numel()} rows); lower it"
            )
        latent = f in latent_features
        catalogue = table_day(cfg, planted, probabilities, table=f, day=day, latent=latent)
        # The values and the standardisation come from `basis`: the day itself, or
        # day k when what days 0 .. k tell is asked for.
        basis, share = catalogue, 1.0
        if known_through is not None:
            share = known_share
            if known_through >= 0:
                k = known_through
                basis = table_day(cfg, planted, probabilities, table=f, day=k, latent=latent)
        items = catalogue.slot_item
        decay = planted._rank_decay(catalogue.entry_rank[items])
        basis_decay = planted._rank_decay(basis.entry_rank[basis.slot_item])
        # Rows entering after day k hold 0 in day k's catalogue: their prior mean.
        raw = basis.first_order[items] * decay * share
        basis_raw = basis.first_order[basis.slot_item] * basis_decay
        mean = probabilities @ basis_raw
        std = float(torch.sqrt(probabilities @ (basis_raw - mean).square()))
        gain = cfg.first_order_scale / math.sqrt(num_features) / std if std > 0 else 0.0
        effects.append((raw - mean) * gain)
        if catalogue.latent is not None and basis.latent is not None:
            vectors.append(basis.latent[items] * decay.unsqueeze(1) * share)
            basis_v = basis.latent[basis.slot_item] * basis_decay.unsqueeze(1)
            mean_v, whitener = _whitening(basis_v, probabilities)
            means.append(mean_v)
            whiteners.append(whitener)
        day0_rows = tables.ids(items.clamp(max=cardinality - 1), torch.tensor(f))
        rows.append(torch.where(items < cardinality, day0_rows, items))
    # The planted model's per-rank tables (planted.py: rank r of table f at head position
    # start_f + r, the latent tables' rows likewise) now hold the day's items, and its
    # standardisation the day's; its first-order table is stored already centred.
    planted._head_first_order = torch.cat(effects)
    if vectors:
        planted._head_latent = torch.cat(vectors)
        planted._latent_means = torch.stack(means)
        planted._whiteners = torch.stack(whiteners)
    return sample_seed(cfg.seed, day), (torch.cat(rows) if day > 0 else None)


def first_new_rows(cfg: SyntheticDataConfig, day: int) -> list[int]:
    """Per table, the first row of the ids entering on day ``day`` (every row on day
    0): an id ``>=`` it was never used before the day (rows are handed out in order)."""
    if day == 0:
        return [0] * len(cfg.cardinalities)
    per_day = [
        new_ids_per_day(c, cfg.new_id_share) if cfg.days > 1 else 0 for c in cfg.cardinalities
    ]
    return [c + (day - 1) * n for c, n in zip(cfg.cardinalities, per_day, strict=True)]


def _whitening(
    vectors: torch.Tensor, probabilities: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Zipf-weighted mean of ``vectors`` and the symmetric inverse square root of
    their covariance (directions without spread dropped), as planted.py's day 0."""
    mean = probabilities @ vectors
    centred = vectors - mean
    cov = centred.T @ (centred * probabilities.unsqueeze(1))
    eigvals, eigvecs = torch.linalg.eigh(cov)
    floor = 1e-9 * eigvals.max().clamp(min=1e-300)
    inv_sqrt = torch.where(eigvals > floor, eigvals.clamp(min=1e-300).rsqrt(), 0.0)
    return mean, eigvecs @ torch.diag(inv_sqrt) @ eigvecs.T
