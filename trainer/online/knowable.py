"""What the days before tell about a day: its knowable oracle, and its ids seen or new.

A day's oracle AUC (``oracle_auc``) scores its eval set with the day's own
planted model, which no model trained on the earlier days can know: the
effects took a random-walk step overnight and the ids entering that day have
effects drawn fresh. The **knowable oracle** (``knowable_auc``) scores the same
samples with the planted model as the end of the day before tells it
(``SyntheticSource.known_model``, ``trainer.data.drift.apply_day``): yesterday's
effects one expected AR(1) step on, the new ids at their prior mean. It is the
best next-day AUC a model trained on the earlier days can reach (up to scoring
the expected logit rather than the expected probability), so
``oracle_auc - knowable_auc`` is the part of the next-day gap that no model
can win back, and ``knowable_auc - auc`` (``knowable_gap``) the part a better
trained model could.

A sample has **new ids** when one of its ids is on a row first used that day
(``drift.first_new_rows``; day 0: every sample); the others have only **seen
ids** (ids the catalogue held before the day, whether or not a training batch
drew them). Each figure is also given on either part (``*_seen_ids``,
``*_new_ids``) when the part has samples.

Example::

    figures, new = day_figures(SyntheticSource(cfg, day=3))
    figures["knowable_auc"], figures["oracle_auc_seen_ids"], float(new.double().mean())
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.drift import first_new_rows
from trainer.data.synthetic import SyntheticSource
from trainer.report.metrics import binary_auc

_CHUNK = 65536


def new_id_samples(source: SyntheticSource, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Bool ``[size]``: which samples of the source's day's batch ``kjt`` hold an id
    first used on that day."""
    first = first_new_rows(source.cfg, source.day)
    size = kjt.stride()
    hits = torch.zeros(size, dtype=torch.int64)
    for key, row in zip(kjt.keys(), first, strict=True):
        bags = kjt[key]
        owner = torch.repeat_interleave(torch.arange(size), bags.lengths().cpu())
        hits.index_add_(0, owner, (bags.values().cpu() >= row).to(torch.int64))
    return hits > 0


def day_figures(source: SyntheticSource) -> tuple[dict[str, float], torch.Tensor]:
    """The day's ``oracle_auc``, ``knowable_auc``, each on the seen-id and new-id
    samples, and ``new_id_samples`` (their share); with the new-id mask of the eval set."""
    known = source.known_model()
    oracle, knowable, labels, new = [], [], [], []
    for start in range(0, source.num_eval_samples, _CHUNK):
        size = min(_CHUNK, source.num_eval_samples - start)
        oracle.append(source.click_probability("eval", start, size).cpu())
        knowable.append(source.click_probability("eval", start, size, model=known).cpu())
        batch = source.batch("eval", start, size)  # drawn once: labels and ids
        labels.append(batch.labels.cpu())
        new.append(new_id_samples(source, batch.sparse_features))
    scores = {"oracle_auc": torch.cat(oracle), "knowable_auc": torch.cat(knowable)}
    y, is_new = torch.cat(labels), torch.cat(new)
    figures = {name: binary_auc(p, y) for name, p in scores.items()}
    for part, mask in (("seen_ids", ~is_new), ("new_ids", is_new)):
        if has_both_labels(y[mask]):
            figures.update(
                {f"{name}_{part}": binary_auc(p[mask], y[mask]) for name, p in scores.items()}
            )
    figures["new_id_samples"] = float(is_new.double().mean())
    return figures, is_new


def has_both_labels(labels: torch.Tensor) -> bool:
    """Whether an AUC is defined on these labels (a click and a non-click among them)."""
    return bool(labels.numel()) and 0 < float(labels.sum()) < labels.numel()
