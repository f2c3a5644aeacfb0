"""Schema of ``data=synthetic`` (``conf/data/synthetic.yaml``).

Kept apart from the source so that the planted model and the source both
import it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainer.data.source import FeatureSpec

# Criteo Kaggle's 26 cardinalities, the large ones capped at 20k rows (and the
# tiny ones raised to 10) so that a DLRM learns the planted model in CPU minutes.
DEFAULT_CARDINALITIES = [
    1460, 583, 20000, 20000, 305, 24, 12517, 633, 10, 20000, 5683, 20000, 3194,
    27, 14992, 20000, 10, 5652, 2173, 10, 20000, 18, 15, 20000, 105, 20000,
]  # fmt: skip

MAX_CARDINALITY = 1 << 31


@dataclass
class SyntheticDataConfig:
    """Schema of ``conf/data/synthetic.yaml``; the planted-model knobs are the
    standard deviations each term adds to the logit (see ``trainer.data.planted``)."""

    name: str = "synthetic"
    num_dense: int = 13
    cardinalities: list[int] = field(default_factory=lambda: list(DEFAULT_CARDINALITIES))
    # One value for every feature, or one per feature; > 1 is multi-hot.
    hotness: list[int] = field(default_factory=lambda: [1])
    # Bag lengths uniform in [1, hotness] instead of exactly hotness.
    variable_hotness: bool = False
    zipf_exponent: float = 1.2
    seed: int = 0
    num_eval_samples: int = 65536
    # Planted model: each scale is the standard deviation its term adds to the
    # logit (single-hot); see trainer.data.planted.
    base_logit: float = -2.5
    dense_scale: float = 0.7
    dense_nonlinear_scale: float = 0.4
    first_order_scale: float = 0.3
    interaction_scale: float = 1.0
    num_interactions: int = 4
    latent_dim: int = 3
    # Both features of an interacting pair have at most this many rows ...
    interaction_max_cardinality: int = 20000
    # ... and one of them at most this many (see planted_layout.select_pairs).
    interaction_small_cardinality: int = 100
    # Effects of the row with frequency rank r shrink as 1 / (1 + r / this);
    # <= 0 keeps the tail as strong as the head.
    effect_decay_rank: float = 10.0
    # Days of a drifting stream (trainer/data/drift.py): 0 is one fixed data set;
    # N > 0 gives days 0 .. N-1 (day 0 is that data set), each with ...
    days: int = 0
    # ... this share of its lookups on ids never seen on an earlier day, ...
    new_id_share: float = 0.05
    # ... this step (std) of a random walk of every id's log-rank per day, ...
    popularity_shift: float = 0.2
    # ... and its planted per-id effects moved by this much per day (an AR(1)
    # keeping their spread: e' = sqrt(1 - d**2) e + d * noise).
    effect_drift: float = 0.1

    def table_rows(self) -> list[int]:
        """Rows each table needs: its cardinality, plus room for every later day's new ids."""
        later = max(self.days - 1, 0)
        return [c + later * new_ids_per_day(c, self.new_id_share) for c in self.cardinalities]

    @property
    def feature_names(self) -> list[str]:
        return [f"cat_{f}" for f in range(len(self.cardinalities))]

    def hotness_per_feature(self) -> list[int]:
        if len(self.hotness) == 1:
            return list(self.hotness) * len(self.cardinalities)
        return list(self.hotness)

    @property
    def features(self) -> list[FeatureSpec]:
        """The source's features, known from the config alone."""
        hotness = self.hotness_per_feature()
        if len(hotness) != len(self.cardinalities):  # validation names the mistake
            hotness = [max(self.hotness, default=1)] * len(self.cardinalities)
        return [
            FeatureSpec(
                name=name,
                num_embeddings=rows,
                ids_per_sample=(1 + h) / 2 if self.variable_hotness else float(h),
                max_ids_per_sample=h,
            )
            for name, rows, h in zip(self.feature_names, self.table_rows(), hotness)
        ]


def new_ids_per_day(cardinality: int, share: float) -> int:
    """Rows a table sets aside per day for new ids (``data.new_id_share`` of the
    lookups): twice the share of its rows, and one more, at most all of them."""
    if share <= 0:
        return 0
    return min(cardinality, math.ceil(2 * share * cardinality) + 1)
