"""The hidden click model behind the synthetic data set.

For a sample with dense features ``x`` and, per categorical feature ``f``, a bag
of frequency ranks ``B_f``::

    logit = base_logit
          + sum_k a_k x_k + sum_k c_k (x_k**2 - 1) / sqrt(2)      # dense effects
          + sum_f mean_{r in B_f} w_f[r]                           # first order
          + sum_{(i, j) in pairs} <u_i(B_i), u_j(B_j)>             # interactions
    u_f(B) = mean_{r in B} v_f[r] - E_r[v_f[r]]

``w_f[r]`` is a scalar and ``v_f[r]`` a ``latent_dim`` vector, both standard
normals hashed from ``(seed, f, r)`` and shrunk by ``1 / sqrt(1 + r /
effect_decay_rank)`` so that rare rows, which a trained model sees too seldom to
learn, carry less signal. Latent vectors are centred on their Zipf-weighted
mean, which makes every interaction invisible to a model that is linear in
one-hot ids. Each ``*_scale`` is the standard deviation its term adds to the
logit (for head rows).

Parameters are recomputed from hashes on every call: no table is stored, so any
cardinality works.

Example::

    model = PlantedModel(cfg, ZipfTables(cfg.cardinalities, exponent=1.05, seed=0))
    logits = model.logits(dense, ranks, mask)   # [size, D], [size, F, H] x2
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from trainer.data.rng import hash_counters, normal, stream_key
from trainer.data.zipf import ZipfTables

if TYPE_CHECKING:
    from trainer.data.synthetic import SyntheticDataConfig


class PlantedModel:
    """Computes true logits of the synthetic click model (float64)."""

    def __init__(self, cfg: SyntheticDataConfig, tables: ZipfTables) -> None:
        num_features = len(cfg.cardinalities)
        self._seed = cfg.seed
        self._base_logit = cfg.base_logit
        self._decay_rank = cfg.effect_decay_rank
        self._latent_dim = cfg.latent_dim
        dense_idx = torch.arange(cfg.num_dense)
        per_term = 1.0 / math.sqrt(max(cfg.num_dense, 1))
        self._dense_linear = normal(stream_key(cfg.seed, "dense_linear"), dense_idx) * (cfg.dense_scale * per_term)
        self._dense_square = normal(stream_key(cfg.seed, "dense_square"), dense_idx) * (
            cfg.dense_nonlinear_scale * per_term
        )
        self._first_order_scale = cfg.first_order_scale / math.sqrt(num_features)
        # Rescale the decay per table so that each term keeps its configured
        # variance under the table's Zipf law: the signal moves to the head rows.
        decay_norms = []
        for f in range(num_features):
            probs = tables.head_probabilities(f)
            decay = self._rank_decay(torch.arange(probs.numel()))
            decay_norms.append(torch.sqrt((probs * decay.square()).sum() / probs.sum()))
        self._decay_norms = torch.stack(decay_norms)
        self.pairs = select_pairs(cfg, num_features)
        self._pair_scale = cfg.interaction_scale / math.sqrt(max(len(self.pairs), 1))
        latent_features = sorted({f for pair in self.pairs for f in pair})
        self._latent_features = torch.tensor(latent_features, dtype=torch.int64)
        slot = {f: s for s, f in enumerate(latent_features)}
        self._pair_left = torch.tensor([slot[i] for i, _ in self.pairs], dtype=torch.int64)
        self._pair_right = torch.tensor([slot[j] for _, j in self.pairs], dtype=torch.int64)
        self._latent_means = torch.stack(
            [self._latent_mean(f, tables.head_probabilities(f)) for f in latent_features]
        ) if latent_features else torch.zeros(0, cfg.latent_dim, dtype=torch.float64)

    def _rank_decay(self, ranks: torch.Tensor) -> torch.Tensor:
        if self._decay_rank <= 0:
            return torch.ones_like(ranks, dtype=torch.float64)
        return 1.0 / (1.0 + ranks.to(torch.float64) / self._decay_rank)

    def _shrink(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        return self._rank_decay(ranks) / self._decay_norms[features]

    def first_order(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """Scalar effects ``w_f[r]``, the broadcast shape of ``features`` and ``ranks``."""
        key = stream_key(self._seed, "first_order")
        return normal(key, features, ranks) * self._shrink(features, ranks) * self._first_order_scale

    def latent(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``v_f[r]``, that broadcast shape plus ``(latent_dim,)``."""
        key = stream_key(self._seed, "latent")
        dims = torch.arange(self._latent_dim)
        # Components of variance 1/sqrt(d) give <v_i, v_j> unit variance.
        vectors = normal(key, features.unsqueeze(-1), ranks.unsqueeze(-1), dims) * self._latent_dim**-0.25
        return vectors * self._shrink(features, ranks).unsqueeze(-1)

    def _latent_mean(self, feature: int, probs: torch.Tensor) -> torch.Tensor:
        # Ranks past the exact head of huge tables are left out: tiny mass each.
        return probs @ self.latent(torch.tensor(feature), torch.arange(probs.numel()))

    def logits(self, dense: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """True logits, float64 ``[size]``.

        ``dense`` is ``[size, num_dense]``; ``ranks`` (int64) and ``mask`` (bool,
        marks the slots that hold an id) are ``[size, num_features, max_hotness]``.
        """
        dense = dense.to(torch.float64)
        logit = self._base_logit + dense @ self._dense_linear
        logit = logit + ((dense.square() - 1.0) * math.sqrt(0.5)) @ self._dense_square
        # Multi-hot bags contribute the mean over their ids.
        bag_weights = mask.to(torch.float64)
        bag_weights = bag_weights / bag_weights.sum(2, keepdim=True).clamp(min=1.0)
        features = torch.arange(ranks.shape[1]).view(1, -1, 1)
        logit = logit + (self.first_order(features, ranks) * bag_weights).sum((1, 2))
        if self.pairs:
            lat = self._latent_features
            vectors = self.latent(lat.view(1, -1, 1), ranks[:, lat])
            pooled = (vectors * bag_weights[:, lat].unsqueeze(-1)).sum(2) - self._latent_means
            products = pooled[:, self._pair_left] * pooled[:, self._pair_right]
            logit = logit + products.sum((1, 2)) * self._pair_scale
        return logit


def select_pairs(cfg: SyntheticDataConfig, num_features: int) -> list[tuple[int, int]]:
    """The ``num_interactions`` feature pairs that interact, fixed by the seed.

    Only features with at most ``interaction_max_cardinality`` rows take part:
    interactions between two huge, mostly rare tables could not be learned
    from a few million samples.
    """
    eligible = [
        f
        for f in range(num_features)
        if cfg.interaction_max_cardinality <= 0 or cfg.cardinalities[f] <= cfg.interaction_max_cardinality
    ]
    candidates = [(i, j) for i in eligible for j in eligible if i < j]
    if cfg.num_interactions > len(candidates):
        raise ValueError(
            f"data.num_interactions={cfg.num_interactions} but only {len(candidates)} pairs of "
            f"features have at most data.interaction_max_cardinality={cfg.interaction_max_cardinality} "
            "rows; lower num_interactions or raise interaction_max_cardinality"
        )
    key = stream_key(cfg.seed, "pairs")
    order = [int(hash_counters(key, i, j)) for i, j in candidates]
    chosen = sorted(range(len(candidates)), key=order.__getitem__)[: cfg.num_interactions]
    return sorted(candidates[c] for c in chosen)
