"""Evaluation metrics for binary click models, exact over an eval set split across ranks.

Each rank feeds its own batches; ``compute()`` is a collective that returns the
metrics of the union of every rank's samples, identical on every rank:

- ``auc``: ROC AUC, ties counted as half (same definition as sklearn's
  ``roc_auc_score``), from torchmetrics' ``BinaryAUROC`` with every prediction
  kept and all-gathered, so it is the exact AUC of the whole eval set.
- ``logloss``: mean binary cross-entropy in nats (the unit of
  ``BCEWithLogitsLoss``), ``ne``: logloss divided by the entropy of the
  empirical CTR, ``calibration``: sum of predicted probabilities / sum of
  labels, ``ctr``: mean label, ``num_samples``: samples seen by all ranks.
  With only one label class in the whole set, ``auc`` and ``ne`` are NaN.
  These come from torchrec's ``NEMetric``, ``CalibrationMetric``,
  ``CTRMetric`` (lifetime values, sum-reduced); ``num_samples`` is counted here
  (torchrec 1.6, the GPU stack, has no ``SumWeightsMetric``).

Example::

    metrics = EvalMetrics(rank=rank, world_size=world_size, batch_size=256,
                          num_samples=len(eval_dataset))
    for batch in eval_loader:                     # this rank's slice
        metrics.update(logits=model(batch), labels=batch.labels)
    results = metrics.compute()                   # every rank calls it
    # {"auc": 0.74, "logloss": 0.47, "ne": 0.89, "calibration": 1.02, ...}

Why AUC is not torchrec's ``AUCMetric``: it sorts predictions and integrates
sample by sample, so tied predictions (constant logits at init, duplicate
feature rows) give an order-dependent value instead of counting ties as half;
and it keeps only a window of the last ``ceil(window_size / world_size)``
samples per rank, silently dropping the rest when a rank holds more.
"""

import math
import warnings

import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.ctr import CTRMetric
from torchrec.metrics.metrics_config import DefaultTaskInfo
from torchrec.metrics.metrics_namespace import MetricName, MetricPrefix
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import RecMetric

from sharding.collectives import all_gather_object

_TASK = DefaultTaskInfo.name
_REC_NAMES = (
    MetricName.NE,
    MetricName.LOG_LOSS,
    MetricName.CALIBRATION,
    MetricName.CTR,
)


def binary_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUC of one process's predictions, ties as half: what ``EvalMetrics`` computes.

    The same torchmetrics computation as :class:`EvalMetrics`' ``BinaryAUROC``
    (``thresholds=None``), for code with every prediction at hand (export, the
    synthetic data's oracle). NaN with only one label class.
    """
    labels = labels.flatten().long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return math.nan
    return float(binary_auroc(probs.flatten().to(torch.float64), labels, thresholds=None))


class EvalMetrics:
    """Accumulates one eval pass; create a fresh instance for each pass.

    ``num_samples`` is the global number of eval samples the pass is expected
    to cover; ``compute()`` warns when the ranks saw a different number (a
    padded sampler duplicating samples, or a loader dropping a tail).
    ``device`` is where the metric state lives; by default the device of the
    first logits. Pass it under NCCL so a rank with no eval batch still joins
    the all-gather with tensors on the right device.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_samples: int,
        device: torch.device | None = None,
    ) -> None:
        self._num_samples = num_samples
        # torchrec splits window_size across ranks and insists each share holds
        # a batch; the window values are unused (we read lifetime ones), so size
        # the window to the whole set to keep them equal anyway.
        window_size = world_size * max(num_samples, batch_size)
        rec_kwargs = {
            "world_size": world_size,
            "my_rank": rank,
            "batch_size": batch_size,
            "tasks": [DefaultTaskInfo],
            "window_size": window_size,
            # Every rank gets the values, not only rank 0.
            "compute_on_all_ranks": True,
        }
        self._rec_metrics: dict[MetricName, RecMetric] = {
            MetricName.NE: NEMetric(**rec_kwargs, include_logloss=True),
            MetricName.CALIBRATION: CalibrationMetric(**rec_kwargs),
            MetricName.CTR: CTRMetric(**rec_kwargs),
        }
        # thresholds=None keeps every prediction: exact AUC, memory O(samples).
        self._auc = BinaryAUROC(thresholds=None)
        self._modules = nn.ModuleList([self._auc, *self._rec_metrics.values()])
        self._device = device
        self._num_seen = 0  # this rank's samples; summed over ranks in compute()
        if device is not None:
            self._modules.to(device)
        # An empty first entry makes a rank with no eval batch still take part
        # in the all-gather; with an empty list state torchmetrics would skip
        # the collective on that rank and the others would hang.
        empty = torch.empty(0, device=device)
        self._auc.update(empty.double(), empty.long())

    @torch.no_grad()
    def update(self, *, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds one batch of this rank: pre-sigmoid ``logits`` and 0/1 ``labels``."""
        if self._device is None:
            self._device = logits.device
            self._modules.to(self._device)
        # float64: in float32, sigmoid(logit > ~17) is exactly 1.0, a tie for AUC
        # and a loss clamped by torchrec's eta. torchrec still caps one sample's
        # loss at -ln(1e-12) = 27.6 nats (|logit| > 27.6).
        probs = torch.sigmoid(logits.detach().to(self._device, torch.float64)).flatten()
        labels = labels.detach().to(self._device).flatten()
        if probs.numel() == 0:
            return
        self._num_seen += probs.numel()
        self._auc.update(probs, labels.long())
        for metric in self._rec_metrics.values():
            metric.update(
                predictions={_TASK: probs},
                labels={_TASK: labels.to(torch.float64)},
                weights=None,
            )

    def compute(self) -> dict[str, float]:
        """Collective: every rank must call it, in the same order as other collectives."""
        # torchmetrics warns when a metric is computed without a real update; an
        # empty rank is expected here, and the global result is still right.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            results: dict[str, torch.Tensor] = {}
            for metric in self._rec_metrics.values():
                results.update(metric.compute())
            rec = {name: _lifetime(results, name) for name in _REC_NAMES}
            seen = float(sum(all_gather_object(self._num_seen)))
            # Same value on every rank, so all raise together instead of some
            # waiting in the AUC all-gather.
            if seen == 0:
                raise ValueError(
                    "eval saw no samples on any rank; check the eval data "
                    "(num_samples and batch_size) before computing metrics"
                )
            # One class only: AUC and NE are undefined (torchmetrics would say
            # AUC 0.0, torchrec NE ~1e11). ctr is global, so every rank skips
            # the AUC all-gather together.
            single_class = rec[MetricName.CTR] in (0.0, 1.0)
            auc = math.nan if single_class else self._auc.compute().item()
        if seen != self._num_samples:
            warnings.warn(
                f"eval covered {seen:.0f} samples over all ranks, expected "
                f"num_samples={self._num_samples}; metrics are over the samples seen",
                stacklevel=2,
            )
        return {
            "auc": auc,
            # torchrec's cross-entropy is in bits (log2); report nats.
            "logloss": rec[MetricName.LOG_LOSS] * math.log(2.0),
            "ne": math.nan if single_class else rec[MetricName.NE],
            "calibration": rec[MetricName.CALIBRATION],
            "ctr": rec[MetricName.CTR],
            "num_samples": seen,
        }


def _lifetime(results: dict[str, torch.Tensor], name: MetricName) -> float:
    """Picks the lifetime value of ``name`` out of RecMetric result dicts."""
    suffix = f"|{MetricPrefix.LIFETIME}{name}"
    (value,) = [v for k, v in results.items() if k.endswith(suffix)]
    return value.item()
