"""The hidden click model behind the synthetic data set.

For a sample with dense features ``x`` and, per categorical feature ``f``, a bag
of frequency ranks ``B_f`` (one rank when single-hot)::

    logit = base_logit
          + sum_k a_k x_k + sum_k c_k (x_k**2 - 1) / sqrt(2)     # dense effects
          + sum_f mean_{r in B_f} w_f[r]                          # first order
          + sum_{(i, j) in pairs} <u_i(B_i), u_j(B_j)>            # interactions
    u_f(B) = W_f (mean_{r in B} v_f[r] - m_f)

``w_f[r]`` (a scalar) and ``v_f[r]`` (a ``latent_dim`` vector) are standard
normals hashed from ``(seed, f, r)`` times ``1 / (1 + r / effect_decay_rank)``:
the signal sits in the frequent rows, which a model sees often enough to learn,
and fades in the long tail, as in real click logs.

Every term is then standardised under its table's Zipf law, with the draws this
seed happened to make: ``w_f`` is centred and scaled, ``m_f`` is the
Zipf-weighted mean of ``v_f`` and ``W_f`` whitens its covariance. So each term
has mean 0 and, for single-hot features, exactly the configured standard
deviation (``dense_scale``, ``dense_nonlinear_scale``, ``first_order_scale``,
``interaction_scale``, each the total over its term's features), whatever the
seed, so the click rate and the oracle AUC barely move with it (12-13% and
0.79-0.81 for the defaults over seeds 0-5). Centring also makes the
interactions invisible to a model that is linear in one-hot ids: no id shifts
the mean of an interaction on its own. The ``num_interactions`` pairs are drawn
by the seed among pairs that include one small table (see ``planted_layout.select_pairs``).

Per-row parameters are recomputed from hashes on every call; only a few
numbers per table are stored, so any cardinality works (the standardising
statistics of huge tables use their first ``zipf.EXACT_RANKS`` ranks).

Example::

    tables = ZipfTables(cfg.cardinalities, exponent=1.2, seed=0)
    model = PlantedModel(cfg, tables, slot_features=torch.arange(26))   # single-hot
    logits = model.logits(dense, ranks)   # [size, D], [size, 26]; full bags
"""

from __future__ import annotations

import math

import torch

from trainer.data.planted_layout import contiguous_ranges, hotness_runs, select_pairs
from trainer.data.rng import normal, stream_key
from trainer.data.synthetic_config import SyntheticDataConfig
from trainer.data.zipf import ZipfTables, broadcast_take, flat_nonzero


class PlantedModel:
    """Computes true logits of the synthetic click model (float64)."""

    def __init__(
        self, cfg: SyntheticDataConfig, tables: ZipfTables, slot_features: torch.Tensor
    ) -> None:
        num_features = len(cfg.cardinalities)
        # Samples come as [size, num_slots] with every feature's bag slots side
        # by side; slot_features names the feature of each column.
        self._slot_features = slot_features
        # Position of each slot in its bag: 0, 1, .. hotness - 1 per feature.
        starts = torch.searchsorted(slot_features, slot_features)
        self._slot_positions = torch.arange(len(slot_features)) - starts
        self._slot_to_feature = torch.nn.functional.one_hot(slot_features, num_features).double()
        # Runs of equally hot features (slot_features is sorted; see planted_layout.hotness_runs).
        hotness = torch.bincount(slot_features, minlength=num_features).tolist()
        self.feature_runs = hotness_runs(hotness)
        self._decay_rank = cfg.effect_decay_rank
        self._latent_dim = cfg.latent_dim
        self._first_order_key = stream_key(cfg.seed, "first_order")
        self._latent_key = stream_key(cfg.seed, "latent")
        dense_idx = torch.arange(cfg.num_dense)
        self._dense_linear = (
            _unit(normal(stream_key(cfg.seed, "dense_linear"), dense_idx)) * cfg.dense_scale
        )
        self._dense_square = _unit(normal(stream_key(cfg.seed, "dense_square"), dense_idx)) * (
            cfg.dense_nonlinear_scale
        )
        # The base logit and the -1 of every (x**2 - 1) / sqrt(2), one number (no host
        # read per draw: a GPU would sync on it).
        self._dense_offset = cfg.base_logit - math.sqrt(0.5) * float(self._dense_square.sum())

        head_effects = [
            self._raw_first_order(torch.tensor(f), torch.arange(len(tables.head_probabilities(f))))
            for f in range(num_features)
        ]
        first_order_stats = [
            _weighted_mean_std(tables.head_probabilities(f), head_effects[f])
            for f in range(num_features)
        ]
        self._first_order_means = torch.tensor([mean for mean, _ in first_order_stats])
        stds = torch.tensor([std for _, std in first_order_stats])
        # A table whose head row has all the mass has no spread to scale.
        self._first_order_gains = torch.where(
            stds > 0, cfg.first_order_scale / math.sqrt(num_features) / stds, 0.0
        )
        # w_f[r] of every tabulated rank, looked up instead of hashed per sample
        # (the same float64 values: elementwise ops do not depend on position).
        head_lengths = torch.tensor([len(w) for w in head_effects], dtype=torch.int64)
        self._head_starts = head_lengths.cumsum(0) - head_lengths
        self._head_last = head_lengths - 1
        self._has_tail = any(
            c > n for c, n in zip(cfg.cardinalities, head_lengths.tolist(), strict=True)
        )
        self._head_first_order = torch.cat(
            [self._centre_first_order(torch.tensor(f), w) for f, w in enumerate(head_effects)]
        )

        self.pairs = select_pairs(cfg, num_features)
        latent_features = sorted({f for pair in self.pairs for f in pair})
        self._latent_features = torch.tensor(latent_features, dtype=torch.int64)
        position = {f: p for p, f in enumerate(latent_features)}
        self._pair_left = torch.tensor([position[i] for i, _ in self.pairs], dtype=torch.int64)
        self._pair_right = torch.tensor([position[j] for _, j in self.pairs], dtype=torch.int64)
        is_latent = torch.isin(slot_features, self._latent_features)
        self._latent_slots = is_latent.nonzero().squeeze(1)
        # The latent slots as runs of consecutive slots (bags are contiguous): slices
        # and one cat read them several times faster than an index along rows.
        self._latent_ranges = contiguous_ranges(self._latent_slots.tolist())
        latent_slot_positions = [position[int(f)] for f in slot_features[is_latent]]
        self._latent_slot_to_feature = torch.zeros(
            len(latent_slot_positions), len(latent_features), dtype=torch.float64
        )
        self._latent_slot_to_feature[
            torch.arange(len(latent_slot_positions)), latent_slot_positions
        ] = 1.0
        stats = [self._latent_stats(f, tables.head_probabilities(f)) for f in latent_features]
        means, whiteners, heads = ([x[k] for x in stats] for k in range(3))
        # v_f[r] of every tabulated rank of the latent features, looked up like w_f;
        # indexed by feature (rows of other features are never read).
        latent_lengths = torch.zeros(num_features, dtype=torch.int64)
        latent_lengths[latent_features] = torch.tensor(
            [h.shape[0] for h in heads], dtype=torch.int64
        )
        self._latent_head_starts = latent_lengths.cumsum(0) - latent_lengths
        self._latent_head_last = latent_lengths - 1
        # From a row's place in every table's head to its place among the latent rows.
        self._latent_shift = self._latent_head_starts - self._head_starts
        # The feature of each row of the latent table (days keep the layout; drift.py).
        self._latent_row_features = torch.repeat_interleave(
            self._latent_features, latent_lengths[self._latent_features]
        )
        self._head_latent = (
            torch.cat(heads) if heads else torch.zeros(0, cfg.latent_dim, dtype=torch.float64)
        )
        self._latent_has_tail = any(
            cfg.cardinalities[f] > latent_lengths[f] for f in latent_features
        )
        # Full bags (fixed hotness): each slot's weight in its bag's mean, 1 / hotness.
        self._full_bag_weights = (
            1.0
            / (torch.ones(len(slot_features), dtype=torch.float64) @ self._slot_to_feature).clamp(
                min=1.0
            )[slot_features]
        )
        d = cfg.latent_dim
        self._latent_means = torch.stack(means) if means else torch.zeros(0, d, dtype=torch.float64)
        self._whiteners = (
            torch.stack(whiteners) if whiteners else torch.zeros(0, d, d, dtype=torch.float64)
        )
        # Whitened vectors have identity covariance: <u_i, u_j> has variance latent_dim.
        self._pair_scale = cfg.interaction_scale / math.sqrt(max(len(self.pairs), 1)) / math.sqrt(d)
        # The interaction term as matrices on a sample's flattened [latent slots * d]
        # vectors (see ``_interactions``): pooling into features (kron with I_d: every
        # dimension alike), with the full bags' 1 / hotness folded in (None: single-hot,
        # nothing to pool), and the pairs' quadratic form, scale included.
        eye = torch.eye(d, dtype=torch.float64)
        self._pool = torch.kron(self._latent_slot_to_feature, eye)
        slot_weights = self._full_bag_weights[self._latent_slots].unsqueeze(1)
        single = len(latent_slot_positions) == len(latent_features)
        self._pool_full = (
            None if single else torch.kron(self._latent_slot_to_feature * slot_weights, eye)
        )
        pair_matrix = torch.zeros(len(latent_features), len(latent_features), dtype=torch.float64)
        for i, j in zip(self._pair_left.tolist(), self._pair_right.tolist(), strict=True):
            pair_matrix[i, j] += self._pair_scale
        self._pair_matrix = torch.kron(pair_matrix, eye)
        # Which latent feature each feature is (0 for the others: never read).
        self._latent_index = torch.zeros(num_features, dtype=torch.int64)
        self._latent_index[self._latent_features] = torch.arange(len(latent_features))
        self._whitened: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None

    def per_slot(self, per_feature: torch.Tensor) -> torch.Tensor:
        """``[size, F]`` -> ``[size, num_slots]``, each feature's value over its bag's
        slots (``per_feature[:, slot_features]`` by a broadcast per run of equally
        hot features: a gather along rows costs several times more)."""
        size = per_feature.shape[0]
        out = per_feature.new_empty(size, len(self._slot_features))
        for lo, hi, h, f_lo, f_hi in self.feature_runs:  # one copy per run, into place
            run = out[:, lo:hi].view(size, f_hi - f_lo, h)
            run.copy_(per_feature[:, f_lo:f_hi].unsqueeze(2).expand(size, f_hi - f_lo, h))
        return out

    def _latent_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., latent_slots]``, by slices of its runs."""
        parts = [x[..., lo:hi] for lo, hi in self._latent_ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _rank_decay(self, ranks: torch.Tensor) -> torch.Tensor:
        if self._decay_rank <= 0:
            return torch.ones_like(ranks, dtype=torch.float64)
        return 1.0 / (1.0 + ranks.to(torch.float64) / self._decay_rank)

    def _raw_first_order(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        return normal(self._first_order_key, features, ranks) * self._rank_decay(ranks)

    def to(self, device: torch.device | str) -> PlantedModel:
        """Moves the stored statistics to ``device`` (in place); returns ``self``."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def _raw_latent(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        dims = torch.arange(self._latent_dim, device=ranks.device)
        vectors = normal(self._latent_key, features.unsqueeze(-1), ranks.unsqueeze(-1), dims)
        return vectors * self._rank_decay(ranks).unsqueeze(-1)

    def _latent_stats(
        self, feature: int, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zipf-weighted mean, whitener and the raw vectors of the tabulated ranks."""
        probs = probs / probs.sum()
        v = self._raw_latent(torch.tensor(feature), torch.arange(probs.numel()))
        mean = probs @ v
        centred = v - mean
        cov = centred.T @ (centred * probs.unsqueeze(1))
        # Symmetric inverse square root; directions without spread (tables with
        # fewer rows than latent_dim) are dropped rather than blown up.
        eigvals, eigvecs = torch.linalg.eigh(cov)
        inv_sqrt = torch.where(
            eigvals > 1e-9 * eigvals.max().clamp(min=1e-300), eigvals.clamp(min=1e-300).rsqrt(), 0.0
        )
        return mean, eigvecs @ torch.diag(inv_sqrt) @ eigvecs.T, v

    def _centre_first_order(self, features: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self._first_order_means[features]) * self._first_order_gains[features]

    def first_order(
        self,
        features: torch.Tensor,
        ranks: torch.Tensor,
        head: torch.Tensor | None = None,
        tail_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar effects ``w_f[r]``, the broadcast shape of ``features`` and ``ranks``.

        ``head`` and ``tail_at`` are ``ZipfTables.draw``'s head positions and tail
        indices of these ranks (computed here when not given).
        """
        if head is None:
            # Per-feature constants are indexed on ``features`` (small), then
            # broadcast: one gather of the size of ``ranks``, not three.
            head = torch.minimum(ranks, self._head_last[features]) + self._head_starts[features]
        effects = self._head_first_order.index_select(0, head.reshape(-1)).view(head.shape)
        if not self._has_tail:
            return effects
        # Ranks past a huge table's tabulated head are hashed as before.
        if ranks.device.type != "cpu":  # no host sync: compute everywhere
            in_tail = ranks > self._head_last[features]
            features = features.expand_as(in_tail)
            raw = self._raw_first_order(features, ranks)
            return torch.where(in_tail, self._centre_first_order(features, raw), effects)
        if tail_at is None:
            tail_at = flat_nonzero(ranks > self._head_last[features])
        if tail_at.numel():
            f = broadcast_take(features, effects.shape, tail_at)
            r = ranks.expand(effects.shape).reshape(-1).index_select(0, tail_at)
            effects.view(-1).index_copy_(
                0, tail_at, self._centre_first_order(f, self._raw_first_order(f, r))
            )
        return effects

    def latent(
        self,
        features: torch.Tensor,
        ranks: torch.Tensor,
        head: torch.Tensor | None = None,
        *,
        whitened: bool = False,
    ) -> torch.Tensor:
        """Raw latent vectors ``v_f[r]`` (before whitening) of latent features,
        ``ranks.shape + (latent_dim,)``; ``features`` broadcasts against ``ranks``;
        ``head``: their head positions from ``ZipfTables.draw`` (optional);
        ``whitened``: ``W_f (v_f[r] - m_f)`` instead, what the interactions multiply."""
        last = self._latent_head_last[features]
        if head is None:
            positions = torch.minimum(ranks, last) + self._latent_head_starts[features]
        else:  # the same rows, laid out for the latent features only
            positions = head + self._latent_shift[features]
        table = self._whitened_head() if whitened else self._head_latent
        vectors = table.index_select(0, positions.reshape(-1))
        vectors = vectors.view(*positions.shape, self._latent_dim)
        if not self._latent_has_tail:
            return vectors
        in_tail = ranks > last
        if ranks.device.type != "cpu":  # no host sync: compute everywhere
            features = features.expand_as(in_tail)
            raw = self._raw_latent(features, ranks)
            if whitened:
                raw = self._whiten(raw, features)
            return torch.where(in_tail.unsqueeze(-1), raw, vectors)
        at = flat_nonzero(in_tail)
        if at.numel():
            f = broadcast_take(features, in_tail.shape, at)
            r = ranks.expand(in_tail.shape).reshape(-1).index_select(0, at)
            raw = self._raw_latent(f, r)
            vectors.view(-1, self._latent_dim).index_copy_(
                0, at, self._whiten(raw, f) if whitened else raw
            )
        return vectors

    def _whiten(self, vectors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``W_f (v - m_f)`` of vectors ``[..., d]`` of latent features ``features``."""
        latent = self._latent_index[features]
        centred = (vectors - self._latent_means[latent]).unsqueeze(-1)
        return (self._whiteners[latent] @ centred).squeeze(-1)

    def _whitened_head(self) -> torch.Tensor:
        """The whitened vectors of every tabulated latent row, laid out like
        ``_head_latent``; made again when the raw table, means or whiteners were
        replaced (drift.py installs a day's) or moved (``to``)."""
        sources = (self._head_latent, self._latent_means, self._whiteners)
        if self._whitened is None or any(
            a is not b for a, b in zip(self._whitened[0], sources, strict=True)
        ):
            whitened = self._whiten(self._head_latent, self._latent_row_features)
            self._whitened = (sources, whitened)
        return self._whitened[1]

    def logits(
        self,
        dense: torch.Tensor,
        ranks: torch.Tensor,
        lengths: torch.Tensor | None = None,
        head: torch.Tensor | None = None,
        tail_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """True logits, float64 ``[size]``.

        ``dense`` is ``[size, num_dense]``; ``ranks`` (int64) is ``[size, num_slots]``;
        ``lengths`` (int64 ``[size, num_features]``) are the bag lengths when they
        vary, ``None`` when every bag is full (slot ``j`` of feature ``f`` holds an
        id iff ``j < lengths[:, f]``). ``head`` and ``tail_at``: the ranks' head
        positions and tail indices from ``ZipfTables.draw``, saving their lookups.
        """
        dense = dense.to(torch.float64)
        logit = torch.mv(dense, self._dense_linear)
        logit.addmv_(dense.square(), self._dense_square, alpha=math.sqrt(0.5))
        logit.add_(self._dense_offset)
        # Multi-hot bags contribute the mean over their ids.
        effects = self.first_order(self._slot_features, ranks, head, tail_at)
        if lengths is None:
            weights = None
            logit.addmv_(effects, self._full_bag_weights)  # [num_slots]: the same every sample
        else:
            # 1 / length on [size, F], then spread over the slots: the same bits as
            # dividing a 0/1 mask by the length per slot, in fewer passes.
            inverse = 1.0 / lengths.clamp(min=1).to(torch.float64)
            dropped = self._slot_positions >= self.per_slot(lengths)
            weights = self.per_slot(inverse).masked_fill_(dropped, 0.0)
            logit.add_((effects * weights).sum(1))
        if self.pairs:
            logit.add_(self._interactions(ranks, head, weights))
        return logit

    def _interactions(
        self, ranks: torch.Tensor, head: torch.Tensor | None, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The pairs' term, ``sum <u_i, u_j>`` times its scale, ``[size]``: the bags'
        whitened vectors (whitening is affine and a bag's weights sum to 1, so the
        bag's mean of whitened rows is the whitened mean), pooled per feature and
        put through the pairs' quadratic form: two small matrix products."""
        vectors = self.latent(
            self._slot_features[self._latent_slots],
            self._latent_columns(ranks),
            None if head is None else self._latent_columns(head),
            whitened=True,
        )
        if weights is None:  # full bags: the 1 / hotness weights are in the pooling
            flat = vectors.view(vectors.shape[0], -1)
            pooled = flat if self._pool_full is None else flat @ self._pool_full
        else:
            vectors = vectors * self._latent_columns(weights).unsqueeze(-1)
            pooled = vectors.view(vectors.shape[0], -1) @ self._pool
        return (pooled @ self._pair_matrix).mul_(pooled).sum(1)


def _weighted_mean_std(probs: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    probs = probs / probs.sum()
    mean = float(probs @ values)
    return mean, float(torch.sqrt(probs @ (values - mean).square()))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Scales ``x`` to unit norm, so a term's variance does not depend on the seed."""
    norm = torch.linalg.vector_norm(x)
    return x / norm if norm > 0 else x
