"""The drifting synthetic stream (trainer/data/drift.py): days, new ids, determinism.

``data.days=0`` must stay the fixed data set it always was (its fingerprint
too: checkpoints of earlier runs resume); day 0 of a drifting stream is that
data set; any day is the same however it is reached; the share of a day's
lookups on ids no earlier day used is ``data.new_id_share``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config.schema import ConfigError
from trainer.config.validate import validate_synthetic
from trainer.data.drift import table_day
from trainer.data.synthetic import SyntheticSource
from trainer.data.synthetic_config import SyntheticDataConfig, new_ids_per_day
from trainer.online.knowable import day_figures

SMALL = SyntheticDataConfig(
    cardinalities=[10, 50, 400, 3000],
    num_dense=3,
    num_interactions=2,
    num_eval_samples=4096,
    days=4,
    new_id_share=0.1,
)
N = 8192


def _ids(source: SyntheticSource, size: int = N) -> dict[str, torch.Tensor]:
    kjt = source.batch("train", 0, size).sparse_features
    return {key: kjt[key].values() for key in kjt.keys()}


def _same_batches(a: SyntheticSource, b: SyntheticSource) -> bool:
    x, y = a.batch("train", 100, 512), b.batch("train", 100, 512)
    return (
        torch.equal(x.dense_features, y.dense_features)
        and torch.equal(x.sparse_features.values(), y.sparse_features.values())
        and torch.equal(x.labels, y.labels)
    )


def test_no_days_keeps_the_fingerprint_of_before_days() -> None:
    # Values computed by the code before data.days existed (commit 438c1a0).
    assert SyntheticSource(SyntheticDataConfig()).fingerprint() == "181fdce49bf2d6b5"
    assert (
        SyntheticSource(
            SyntheticDataConfig(
                cardinalities=[10, 50, 400, 3000],
                num_dense=3,
                num_interactions=2,
                num_eval_samples=2048,
                hotness=[2],
                variable_hotness=True,
            )
        ).fingerprint()
        == "13c2f5a9be1279f4"
    )


def test_day_zero_is_the_fixed_data_set_and_tables_hold_every_day() -> None:
    fixed = SyntheticSource(dataclasses.replace(SMALL, days=0))
    day0 = SyntheticSource(SMALL, day=0)
    assert _same_batches(fixed, day0)
    assert fixed.oracle_auc() == day0.oracle_auc()
    assert day0.fingerprint() != fixed.fingerprint()  # the day is part of it
    rows = SMALL.table_rows()
    assert [f.num_embeddings for f in day0.features] == rows
    assert rows == [c + 3 * new_ids_per_day(c, 0.1) for c in SMALL.cardinalities]
    for day in range(SMALL.days):
        for f, values in enumerate(_ids(SyntheticSource(SMALL, day=day), 2048).values()):
            assert 0 <= int(values.min()) and int(values.max()) < rows[f]


def test_a_day_is_the_same_however_it_is_reached() -> None:
    alone = SyntheticSource(SMALL, day=3)
    for day in range(3):  # other days drawn first, in the same process
        SyntheticSource(SMALL, day=day).batch("train", 0, 256)
    after = SyntheticSource(SMALL, day=3)
    assert _same_batches(alone, after)
    assert alone.fingerprint() == after.fingerprint()
    assert torch.equal(
        alone.click_probability("eval", 0, 256), after.click_probability("eval", 0, 256)
    )


def test_days_differ_and_each_has_its_oracle() -> None:
    days = [SyntheticSource(SMALL, day=day) for day in range(SMALL.days)]
    for a, b in zip(days, days[1:]):
        assert not _same_batches(a, b)
        assert a.fingerprint() != b.fingerprint()
    oracles = [d.reference_metrics()["oracle_auc"] for d in days]
    assert len(set(oracles)) == len(oracles)
    # Each term is standardised every day: the oracle and the click rate stay put.
    assert max(oracles) - min(oracles) < 0.05
    rates = [float(d.batch("eval", 0, 4096).labels.mean()) for d in days]
    assert max(rates) - min(rates) < 0.04


@pytest.mark.parametrize("day", [1, 2, 3])
def test_the_share_of_new_ids_is_new_id_share(day: int) -> None:
    earlier = [_ids(SyntheticSource(SMALL, day=d)) for d in range(day)]
    today = _ids(SyntheticSource(SMALL, day=day))
    unseen = entered = total = 0
    for f, (key, values) in enumerate(today.items()):
        seen = torch.unique(torch.cat([ids[key] for ids in earlier]))
        unseen += int((~torch.isin(values, seen)).sum())
        # The rows set aside for the day's new items (none used on an earlier day).
        first = SMALL.cardinalities[f] + (day - 1) * new_ids_per_day(SMALL.cardinalities[f], 0.1)
        entered += int((values >= first).sum())
        total += values.numel()
    assert abs(entered / total - SMALL.new_id_share) < 0.025
    # Unseen in the samples drawn: the new ids, and tail ids no earlier sample hit.
    assert entered <= unseen and abs(unseen / total - SMALL.new_id_share) < 0.03


def test_new_ids_never_take_a_rank_over_half_the_share() -> None:
    # At 5% no rank of the 10-row table is that light: its head ranks stay its own
    # (they once went to new ids: 58% of its lookups on ids new that day).
    cfg = dataclasses.replace(SMALL, new_id_share=0.05)
    source = SyntheticSource(cfg, day=0)
    for f, cardinality in enumerate(cfg.cardinalities):
        probabilities = source._tables.head_probabilities(f)
        day1 = table_day(cfg, source._planted, probabilities, table=f, day=1, latent=False)
        taken = day1.slot_item >= cardinality  # no popularity step after they enter
        assert bool((probabilities[taken] <= cfg.new_id_share / 2).all())
        assert bool(taken.any()) == (f > 0)


KNOWABLE = dataclasses.replace(SMALL, effect_drift=0.3)


def test_the_knowable_oracle_is_below_the_oracle_and_deterministic() -> None:
    source = SyntheticSource(KNOWABLE, day=2)
    figures, new = day_figures(source)
    assert 0.6 < figures["knowable_auc"] < figures["oracle_auc"] - 0.005
    for part in ("seen_ids", "new_ids"):
        assert figures[f"knowable_auc_{part}"] < figures[f"oracle_auc_{part}"]
    assert 0.1 < float(new.double().mean()) == figures["new_id_samples"] < 0.9
    # Day 0: nothing known yet, every sample is new; only the dense terms are scored.
    first, is_new = day_figures(SyntheticSource(KNOWABLE, day=0))
    assert bool(is_new.all()) and "knowable_auc_seen_ids" not in first
    assert first["knowable_auc"] < figures["knowable_auc"]
    again = SyntheticSource(KNOWABLE, day=2)  # another source, after day 0's
    assert torch.equal(
        source.click_probability("eval", 0, 512, model=source.known_model()),
        again.click_probability("eval", 0, 512, model=again.known_model()),
    )


def test_the_knowable_oracle_is_the_oracle_when_nothing_changes() -> None:
    still = dataclasses.replace(SMALL, new_id_share=0.0, effect_drift=0.0, popularity_shift=0.0)
    figures, new = day_figures(SyntheticSource(still, day=2))
    assert figures["knowable_auc"] == figures["oracle_auc"]
    assert not bool(new.any()) and figures["new_id_samples"] == 0.0


def test_without_new_ids_the_id_set_stays() -> None:
    cfg = dataclasses.replace(SMALL, new_id_share=0.0)
    assert cfg.table_rows() == cfg.cardinalities
    ids = _ids(SyntheticSource(cfg, day=2))
    for f, values in enumerate(ids.values()):
        assert int(values.max()) < cfg.cardinalities[f]


def test_invalid_days_name_the_key() -> None:
    with pytest.raises(ValueError, match="data.days=4"):
        SyntheticSource(SMALL, day=4)
    for bad, key in [
        (dict(days=-1), "data.days"),
        (dict(new_id_share=0.7), "data.new_id_share"),
        (dict(effect_drift=1.5), "data.effect_drift"),
        (dict(popularity_shift=-0.1), "data.popularity_shift"),
        (dict(cardinalities=[10, 70000]), "data.cardinalities"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate_synthetic(dataclasses.replace(SMALL, **bad))
