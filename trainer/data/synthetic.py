"""A synthetic, Criteo-shaped click data set with a known best AUC.

Each sample has ``num_dense`` standard-normal dense features and one bag of ids
per categorical feature ``cat_0 ... cat_{n-1}``; ids follow a Zipf law per
table and the click label is drawn from the planted model in
``trainer.data.planted`` (dense effects, per-id effects and pairwise
interactions of latent vectors). Because the true click probability of every
sample is known, ``oracle_auc()`` says how well any model could possibly do.

Every sample is a pure function of ``(seed, split, global index)`` computed with
counter-based hashing (``trainer.data.rng``), so data are deterministic, do not
depend on the world size, and rank ``r`` at step ``s`` simply reads
``start = (s * world_size + r) * batch_size`` (see ``trainer.data.loader``).

The sparse features come as a ``KeyedJaggedTensor`` in torchrec's layout:
feature-major, then sample. Two samples with ``hotness=[2]`` and
``variable_hotness=True`` over features ``cat_0, cat_1`` might be::

    keys    = ["cat_0",        "cat_1"]
    lengths = [1,      2,      2,          1]       # int32, [num_features * size]
    values  = [17,     4, 9,   301, 301,   5]       # int64 ids < cardinality
               sample0 sample1 sample0     sample1

The defaults are calibrated like real click logs and so that model quality
means something (CPU, seed 0, measured 2026-11): oracle AUC 0.803 (0.79-0.81
over seeds), click rate 12.3%; a logistic regression on dense features, their
squares and one-hot ids (150k samples) reaches 0.705, the best any model without
interactions can do; the default DLRM (``python -m trainer``: 16-dim tables,
row-wise Adagrad 0.05, Adam 0.001, batch 1024) reaches 0.781 / 0.793 / 0.798
after 0.5M / 1M / 2M samples, 2M taking about 100 s on one CPU thread.

Example::

    data = SyntheticCriteo(SyntheticDataConfig())
    batch = data.batch("train", start=0, size=1024)
    batch.dense_features.shape      # [1024, 13]
    batch.sparse_features.keys()    # ["cat_0", ..., "cat_25"]
    data.oracle_auc()               # ~0.8
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.drift import apply_day, fingerprint_settings
from trainer.data.loader import check_rank, eval_batches
from trainer.data.planted import PlantedModel
from trainer.data.planted_layout import pack_kept
from trainer.data.rng import stream_key, uniform
from trainer.data.slot_draw import dense_normals, slot_ids, slot_ranks
from trainer.data.source import FeatureSpec
from trainer.data.synthetic_config import SyntheticDataConfig
from trainer.data.zipf import ZipfTables
from trainer.report.metrics import binary_auc

SPLITS = ("train", "eval")
_EVAL_CHUNK = 1 << 16
# Bag slots (samples x ids per sample) drawn per vectorised call (see
# ``SyntheticSource.train_batches``): large enough to amortise the per-call cost
# (~280 tensor ops, ~1 ms at batch 1, 1.5 ms with 178 ids per sample), small
# enough that the temporaries stay in cache (2 loaded EPYC cores, CPU time per
# 2048 samples, 2026-11-29: single-hot 5.1 ms at 262k slots, 4.6 at 524k, 5.1 at
# 1M; 178 ids per sample 21.4 / 20.5 / 19.3 ms).
TRAIN_CHUNK_SLOTS = 1 << 19


class SyntheticSource:
    """Deterministic, index-addressable synthetic click data (train and eval streams).

    A :class:`trainer.data.source.DataSource`; the config is checked beforehand by
    ``trainer.config.validate`` (``validate_synthetic``). ``day``: the day of a
    drifting stream (``data.days``; trainer/data/drift.py).
    """

    def __init__(self, cfg: SyntheticDataConfig, *, day: int = 0) -> None:
        self.cfg = cfg
        self.day = day
        self.feature_names = cfg.feature_names
        self.num_dense = cfg.num_dense
        self.cardinalities = list(cfg.cardinalities)
        self.hotness = cfg.hotness_per_feature()
        self.num_eval_samples = cfg.num_eval_samples
        # A sample is [num_slots] wide: cat_0's bag slots, then cat_1's, ...
        hotness = torch.tensor(self.hotness, dtype=torch.int64)
        self._slot_features = torch.repeat_interleave(hotness)
        self._slot_positions = torch.cat([torch.arange(h) for h in self.hotness])
        # Constants of every draw, built once.
        self._dense_columns = torch.arange(self.num_dense)
        self._feature_columns = torch.arange(len(self.cardinalities))
        self._hotness_f64 = hotness.to(torch.float64)
        self._host_bag_constants = (self._feature_columns, self._hotness_f64)
        self._hotness_i32 = hotness.to(torch.int32)
        self._single_hot = all(h == 1 for h in self.hotness)
        # Positions in a bag, 0 .. longest bag - 1.
        self._bag_positions = torch.arange(max(self.hotness, default=1))
        self._tables = ZipfTables(self.cardinalities, exponent=cfg.zipf_exponent, seed=cfg.seed)
        self._planted = PlantedModel(cfg, self._tables, self._slot_features)
        # Runs of features with the same hotness (planted_layout.hotness_runs): a run's ids
        # reach the KJT's feature-major layout by one transpose.
        self._runs = self._planted.feature_runs
        self._oracle_auc: float | None = None
        self._known: PlantedModel | None = None  # known_model(), built when asked
        # The day's sample seed and rows per rank (None: ZipfTables.ids); drift.py.
        self._seed, self._day_rows = apply_day(cfg, day, self._tables, self._planted)

    @property
    def features(self) -> list[FeatureSpec]:
        return self.cfg.features

    @property
    def device(self) -> torch.device:
        """Where samples are drawn (and batches returned): the CPU unless ``to()`` moved it."""
        return self._slot_features.device

    def to(self, device: torch.device | str) -> SyntheticSource:
        """Draws on ``device`` from now on, bit-identical ids and dense features
        (labels up to the last bit of a float64 ``exp``); returns ``self``.

        On CUDA a batch costs no host sync: with full bags (fixed hotness) every
        shape is known from the config and the batch size; variable bags also draw
        their lengths on the host (an ``[n, F]`` hash, about 1/40 of the draw) for
        the per-key totals that size the packed ids (see
        ``tests/test_synthetic_no_sync.py``).
        """
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        self._tables.to(device)
        self._planted.to(device)
        return self

    def train_batches(
        self, *, batch_size: int, rank: int, world_size: int, first_step: int, num_steps: int
    ) -> Iterator[Batch]:
        """The batches ``rank_batches`` gives, drawn a chunk of steps at a time.

        A chunk of about ``TRAIN_CHUNK_SLOTS`` ids (at least one step) is one
        vectorised draw, split into its steps: fewer, larger tensor ops for the
        same samples (each is a pure function of its index), memory bounded by the
        chunk.
        """
        check_rank(rank, world_size, batch_size)
        steps_per_chunk = max(1, TRAIN_CHUNK_SLOTS // (batch_size * len(self._slot_features)))
        within = torch.arange(batch_size, dtype=torch.int64, device=self.device)
        end = first_step + num_steps
        for chunk_first in range(first_step, end, steps_per_chunk):
            chunk_end = min(chunk_first + steps_per_chunk, end)
            steps = torch.arange(chunk_first, chunk_end, device=self.device)
            starts = (steps * world_size + rank) * batch_size
            indices = (starts.unsqueeze(1) + within).reshape(-1)
            host = None
            if self._host_lengths:  # the same indices, on the host
                host_starts = (
                    torch.arange(chunk_first, chunk_end) * world_size + rank
                ) * batch_size
                host = (host_starts.unsqueeze(1) + torch.arange(batch_size)).reshape(-1)
            yield from self._batches("train", indices, batch_size, host)

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        return eval_batches(self, batch_size=batch_size, rank=rank, world_size=world_size)

    def reference_metrics(self) -> dict[str, float]:
        return {"oracle_auc": self.oracle_auc()}

    def fingerprint(self) -> str:
        """Hash of every setting that shapes the samples."""
        settings = json.dumps(fingerprint_settings(self.cfg, self.day), sort_keys=True)
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        # The step is the position (samples are a function of their index); the
        # fingerprint makes a resume onto other data fail loudly. Bytes as a tensor:
        # checkpoints hold tensors only, so loading never unpickles.
        return {"fingerprint": torch.tensor(list(self.fingerprint().encode()), dtype=torch.uint8)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = bytes(state["fingerprint"].tolist()).decode()
        if saved != self.fingerprint():
            raise ValueError(
                f"the checkpoint was written for other synthetic data (fingerprint {saved}, "
                f"this run {self.fingerprint()}); resume with the checkpoint's data.* settings"
            )

    @property
    def interaction_pairs(self) -> list[tuple[int, int]]:
        """Feature index pairs whose latent vectors interact in the planted model."""
        return list(self._planted.pairs)

    def batch(self, split: str, start: int, size: int) -> Batch:
        """Samples ``[start, start + size)`` of ``split`` ("train" or "eval")."""
        self._check_range(split, start, size)
        host = torch.arange(start, start + size) if self._host_lengths else None
        (batch,) = self._batches(split, self._indices(start, size), size, host)
        return batch

    @property
    def _host_lengths(self) -> bool:
        """Whether bag lengths are also drawn on the host: variable bags on a device,
        where the KJT's per-key totals must be known without reading the device."""
        return self.cfg.variable_hotness and self.device.type != "cpu"

    def _batches(
        self,
        split: str,
        indices: torch.Tensor,
        batch_size: int,
        host_indices: torch.Tensor | None = None,
    ) -> list[Batch]:
        """The samples ``indices`` (int64 ``[k * batch_size]``), drawn in one go, as
        ``k`` batches of ``batch_size`` in order; ``host_indices``: the same indices
        on the CPU (needed when ``_host_lengths``)."""
        if self._dense_columns.device != self.device:
            # Moved piecemeal (e.g. by an older caller setting the slot tensors):
            # bring the rest along.
            self.to(self.device)
        dense, ranks, lengths, head, tail_at = self._draw_with_head(split, indices)
        probs = torch.sigmoid(self._planted.logits(dense, ranks, lengths, head, tail_at))
        u_label = uniform(stream_key(self._seed, split, "label"), indices)
        labels = (u_label < probs).to(torch.float32)
        dense = dense.to(torch.float32)
        if self._day_rows is None:
            ids = slot_ids(self._tables, ranks, self._slot_features)
        else:  # a later day's catalogue: its row at each rank (head position)
            ids = self._day_rows.index_select(0, head.reshape(-1)).view(head.shape)
        totals = None
        if self._host_lengths:
            if host_indices is None:
                raise ValueError("variable bags on a device need the indices on the host too")
            # The same lengths as the device's (integer hash, one exactly rounded
            # product): their per-key totals size the packed values without a sync.
            host_lengths = self._bag_lengths(split, host_indices.unsqueeze(1), torch.device("cpu"))
            totals = host_lengths.view(-1, batch_size, host_lengths.shape[1]).sum(1).tolist()
        batches = []
        for k, lo in enumerate(range(0, indices.numel(), batch_size)):
            rows = slice(lo, lo + batch_size)
            batches.append(
                Batch(
                    dense_features=dense[rows],
                    sparse_features=self._jagged(
                        ids[rows],
                        None if lengths is None else lengths[rows],
                        None if totals is None else totals[k],
                    ),
                    labels=labels[rows],
                )
            )
        return batches

    def _jagged(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor | None,
        length_per_key: list[int] | None = None,
    ) -> KeyedJaggedTensor:
        """``[size, num_slots]`` ids and bag lengths (``None``: full bags) as a
        feature-major KJT.

        Full bags: every shape and length is known from the config, so values are
        a transpose per run of equally hot features and the lengths a constant: no
        host sync on CUDA. Variable bags keep a bag's first ``length`` ids: by a
        boolean mask without ``length_per_key`` (the CPU), else by ``pack_kept``,
        sized by those host-known totals (a device: no sync).
        """
        size, num_features = ids.shape[0], len(self.hotness)
        # [size, run features * h] -> [run features, size, h], runs concatenated.
        values = ids.new_empty(ids.numel())
        for lo, hi, _, f_lo, f_hi in self._runs:  # one copy per run, straight into place
            run = values[lo * size : hi * size].view(f_hi - f_lo, size, -1)
            run.copy_(ids[:, lo:hi].view(size, f_hi - f_lo, -1).transpose(0, 1))
        if lengths is None:
            kjt_lengths = self._hotness_i32.unsqueeze(1).expand(num_features, size).reshape(-1)
            length_per_key = [h * size for h in self.hotness]
        else:
            # The same layout's mask of the ids each bag keeps: slot j of a bag iff
            # j < its length.
            by_feature = lengths.T
            keep = [
                (self._bag_positions[:h] < by_feature[f_lo:f_hi].unsqueeze(2)).reshape(-1)
                for _, _, h, f_lo, f_hi in self._runs
            ]
            keep_all = keep[0] if len(keep) == 1 else torch.cat(keep)
            if length_per_key is None:
                values = values[keep_all]  # a boolean mask: fastest on a CPU
            else:
                values = pack_kept(values, keep_all, sum(length_per_key))
            kjt_lengths = by_feature.to(torch.int32).reshape(-1)
        return KeyedJaggedTensor(
            keys=self.feature_names,
            values=values,
            lengths=kjt_lengths,
            stride=size,
            length_per_key=length_per_key,
        )

    def click_probability(
        self, split: str, start: int, size: int, *, model: PlantedModel | None = None
    ) -> torch.Tensor:
        """True click probabilities (float64 ``[size]``) of the samples ``batch`` returns;
        ``model``: another planted model's (e.g. :meth:`known_model`) for the same samples."""
        self._check_range(split, start, size)
        draw = self._draw_with_head(split, self._indices(start, size))
        return torch.sigmoid((model or self._planted).logits(*draw))

    def known_model(self) -> PlantedModel:
        """The planted model as far as the days before this one tell it (drift.py's
        ``apply_day(known_through=day - 1)``): what the knowable oracle scores with."""
        if self._known is None:
            known = PlantedModel(self.cfg, self._tables, self._slot_features)
            apply_day(self.cfg, self.day, self._tables, known, known_through=self.day - 1)
            self._known = known.to(self.device)
        return self._known

    def batch_at(self, split: str, indices: torch.Tensor) -> Batch:
        """The samples ``indices`` (int64, any subset, any order) of ``split`` as one batch."""
        lo, hi = (int(indices.min()), int(indices.max()) + 1) if indices.numel() else (0, 0)
        self._check_range(split, lo, hi - lo)
        host = indices.cpu() if self._host_lengths else None
        (batch,) = self._batches(split, indices.to(self.device), indices.numel(), host)
        return batch

    def oracle_auc(self) -> float:
        """AUC of the true probabilities against the drawn labels on the whole eval set."""
        if self._oracle_auc is None:
            probs, labels = [], []
            for start in range(0, self.num_eval_samples, _EVAL_CHUNK):
                size = min(_EVAL_CHUNK, self.num_eval_samples - start)
                probs.append(self.click_probability("eval", start, size))
                labels.append(self.batch("eval", start, size).labels)
            self._oracle_auc = binary_auc(torch.cat(probs), torch.cat(labels))
        return self._oracle_auc

    def _indices(self, start: int, size: int) -> torch.Tensor:
        return torch.arange(start, start + size, dtype=torch.int64, device=self.device)

    def _check_range(self, split: str, start: int, size: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {SPLITS}")
        if start < 0 or size < 0:
            raise ValueError(f"start={start} and size={size} must be >= 0")
        if split == "eval" and start + size > self.num_eval_samples:
            raise ValueError(
                f"eval samples [{start}, {start + size}) exceed "
                f"data.num_eval_samples={self.num_eval_samples}"
            )

    def _draw(
        self, split: str, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Dense features ``[n, D]`` (float64), ranks ``[n, num_slots]`` and bag
        lengths ``[n, F]`` (``None`` when every bag is full) of the samples
        ``indices`` (int64 ``[n]``)."""
        return self._draw_with_head(split, indices)[:3]

    def _draw_with_head(
        self, split: str, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``_draw``'s dense features, ranks and lengths, then the ranks' head
        positions and tail indices (``ZipfTables.draw``) for the planted model."""
        seed = self._seed
        idx = indices.unsqueeze(1)
        dense = dense_normals(stream_key(seed, split, "dense"), indices, self._dense_columns)
        # A slot's id depends on (sample, feature, position in the bag) only: not on
        # the hotness of other features, nor on the bag's length (slot_draw.py).
        ranks, head, tail_at = slot_ranks(
            self._tables,
            stream_key(seed, split, "ids"),
            indices,
            self._slot_features,
            self._slot_positions,
            self._feature_columns,
            None if self._single_hot else self._planted.per_slot,
        )
        if not self.cfg.variable_hotness:
            return dense, ranks, None, head, tail_at
        return dense, ranks, self._bag_lengths(split, idx, self.device), head, tail_at

    def _bag_lengths(self, split: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Bag lengths ``[n, F]`` (int64, uniform in 1 .. hotness) of the samples
        ``idx`` (``[n, 1]``), drawn on ``device`` (bit-identical on every device)."""
        if device == self.device:
            columns, hotness = self._feature_columns, self._hotness_f64
        else:  # the host's copies (a tuple: ``to()`` leaves them on the CPU)
            columns, hotness = self._host_bag_constants
        u_length = uniform(stream_key(self._seed, split, "bag_length"), idx, columns)
        return 1 + torch.floor(u_length * hotness).to(torch.int64)


# The name the tests and scripts have used since the first issue.
SyntheticCriteo = SyntheticSource
