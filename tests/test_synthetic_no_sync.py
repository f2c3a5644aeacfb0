"""The fast synthetic input path: exact equivalences and no host sync on CUDA.

The batch drawing of ``trainer.data.synthetic`` takes shortcuts (a guessed
Zipf rank confirmed against the CDF instead of a binary search, a staged hash,
looked-up latent vectors, a static KJT layout); each is checked here against the
straightforward computation it replaces, bit for bit. The CUDA path is checked
for host syncs without a GPU (variable bags too: their lengths are also drawn on
the host, for the totals that size the packed ids): every device but the CPU
takes the same code path, and on the ``meta`` device tensors carry shapes but no
data, so any op whose result needs the data on the host (``.item()``,
``.tolist()``, ``nonzero``, a boolean mask, ``torch.unique``) raises. (A fake ``cuda`` device under
``FakeTensorMode`` would be closer, but on a CPU-only build advanced indexing
there tries to initialise CUDA.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch

from trainer.data import SyntheticCriteo, SyntheticDataConfig
from trainer.data.planted_layout import pack_kept
from trainer.data.rng import hash_counters, mix64, to_uniform, uniform
from trainer.data.zipf import EXACT_RANKS, ZipfTables

SMALL = SyntheticDataConfig(
    cardinalities=[7, 50, 1000, 30000], num_dense=3, num_eval_samples=64, num_interactions=2
)
# Tables past zipf.EXACT_RANKS (tail ranks, hashed first-order and latent
# effects), uneven fixed hotness as in the MLPerf DCNv2 shape, pairs among the
# big tables.
HUGE = dataclasses.replace(
    SMALL,
    cardinalities=[7, 40_000_000, 300, 100_000],
    hotness=[1, 5, 2, 7],
    interaction_max_cardinality=40_000_000,
    interaction_small_cardinality=40_000_000,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("exponent", [0.8, 1.0, 1.2, 2.0])
def test_zipf_guess_equals_the_binary_search(exponent: float) -> None:
    tables = ZipfTables([7, 50, 1000, 100_000, 40_000_000], exponent=exponent, seed=0)
    which = torch.arange(5)
    u = uniform(11, torch.arange(20_000).unsqueeze(1), which)
    # Edge uniforms too: the smallest and largest the generator makes, and the
    # CDF entries themselves (the guess must land on the left side of a tie).
    edges = torch.tensor([2.0**-54, 1.0 - 2.0**-54], dtype=torch.float64)
    u = torch.cat([u, edges.unsqueeze(1).expand(2, 5)])
    u = torch.cat([u, tables.head_probabilities(2).cumsum(0)[:64].unsqueeze(1).expand(64, 5)])
    shifted = u + which.to(torch.float64)
    expected = torch.searchsorted(tables._padded_cdf, shifted.reshape(-1)) - 1
    got = tables._search(u, shifted, which)
    assert torch.equal(got.reshape(-1), expected)


def test_zipf_guess_is_confirmed_for_almost_every_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    # The speed rests on the guess: a regression to searching everything would
    # still be exact, so count the searched elements.
    tables = ZipfTables([100_000] * 8 + [20, 1000], exponent=1.2, seed=0)
    which = torch.arange(10)
    u = uniform(3, torch.arange(10_000).unsqueeze(1), which)
    searched = []
    search = torch.searchsorted

    def counting(sorted_sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        searched.append(values.numel())
        return search(sorted_sequence, values)

    monkeypatch.setattr(torch, "searchsorted", counting)
    tables._search(u, u + which.to(torch.float64), which)
    assert sum(searched) < 0.02 * u.numel(), sum(searched)


def test_staged_hash_equals_hashing_every_slot() -> None:
    data = SyntheticCriteo(HUGE)
    idx = torch.arange(100, 200).unsqueeze(1)
    per_feature = mix64(hash_counters(5, idx) ^ data._feature_columns)
    staged = to_uniform(mix64(per_feature[:, data._slot_features] ^ data._slot_positions))
    direct = uniform(5, idx, data._slot_features, data._slot_positions)
    assert torch.equal(staged, direct)


def test_latent_lookup_equals_hashing() -> None:
    planted = SyntheticCriteo(HUGE)._planted
    latent = sorted({f for pair in planted.pairs for f in pair})
    assert 1 in latent, planted.pairs  # the 40M-row table, with its hashed tail
    features = torch.tensor(latent).repeat_interleave(4)
    ranks = torch.tensor([0, 5, EXACT_RANKS - 1, EXACT_RANKS + 777] * len(latent))
    hashed = planted._raw_latent(features, ranks)
    torch.testing.assert_close(planted.latent(features, ranks), hashed, rtol=0, atol=0)


@pytest.mark.parametrize("variable", [False, True], ids=["full_bags", "variable_bags"])
def test_lookups_by_the_draws_head_positions_equal_lookups_by_rank(variable: bool) -> None:
    # ZipfTables.draw hands the planted model each rank's head position and the
    # tail indices; the logits must equal those computed from the ranks alone.
    data = SyntheticCriteo(dataclasses.replace(HUGE, variable_hotness=variable))
    dense, ranks, lengths, head, tail_at = data._draw_with_head("train", torch.arange(700))
    assert tail_at is not None and tail_at.numel() > 0  # the 40M-row table's tail
    planted = data._planted
    fast = planted.logits(dense, ranks, lengths, head, tail_at)
    assert torch.equal(fast, planted.logits(dense, ranks, lengths))
    per_feature = torch.arange(700 * 4).view(700, 4)
    assert torch.equal(planted.per_slot(per_feature), per_feature[:, data._slot_features])


def _reference_logits(data: SyntheticCriteo, n: int) -> torch.Tensor:
    """The planted logit term by term, as planted.py's docstring writes it: raw
    vectors pooled per bag, centred and whitened per feature, then the pairs."""
    planted, (dense, ranks, lengths) = data._planted, data._draw("train", torch.arange(n))
    hotness = torch.tensor(data.hotness)
    kept = hotness.expand(n, -1) if lengths is None else lengths  # [n, F]
    in_bag = planted._slot_positions < kept[:, data._slot_features]
    weights = in_bag / kept[:, data._slot_features].double()  # 1 / length, 0 if dropped
    logit = planted._dense_offset + dense @ planted._dense_linear
    logit = logit + (dense.square() * math.sqrt(0.5)) @ planted._dense_square
    logit = logit + (planted.first_order(data._slot_features, ranks) * weights).sum(1)
    whitened = {}
    for f in sorted({f for pair in planted.pairs for f in pair}):
        slots = data._slot_features == f
        vectors = planted.latent(torch.tensor(f), ranks[:, slots])  # raw, [n, h, d]
        pooled = (vectors * weights[:, slots].unsqueeze(-1)).sum(1)
        latent = int(planted._latent_index[f])
        centred = pooled - planted._latent_means[latent]
        whitened[f] = centred @ planted._whiteners[latent].T
    for i, j in planted.pairs:
        logit = logit + (whitened[i] * whitened[j]).sum(1) * planted._pair_scale
    return logit


@pytest.mark.parametrize("variable", [False, True], ids=["full_bags", "variable_bags"])
def test_interactions_as_matrix_products_equal_the_term_by_term_logit(variable: bool) -> None:
    # planted.py whitens the table rows once and pools and pairs by two matrix
    # products; the same numbers up to float64 rounding (HUGE: hashed tail vectors).
    data = SyntheticCriteo(dataclasses.replace(HUGE, variable_hotness=variable))
    expected = _reference_logits(data, 700)
    torch.testing.assert_close(
        data._planted.logits(*data._draw("train", torch.arange(700))), expected, rtol=0, atol=1e-12
    )
    single = SyntheticCriteo(dataclasses.replace(SMALL, num_interactions=3))
    torch.testing.assert_close(
        single._planted.logits(*single._draw("train", torch.arange(500))),
        _reference_logits(single, 500),
        rtol=0,
        atol=1e-12,
    )


def test_full_bags_build_a_static_kjt() -> None:
    data = SyntheticCriteo(HUGE)
    kjt = data.batch("train", 64, 10).sparse_features
    # Lengths are the hotness of each key, repeated per sample; values in key order.
    assert kjt.lengths().tolist() == [h for h in [1, 5, 2, 7] for _ in range(10)]
    assert kjt.length_per_key() == [10, 50, 20, 70]
    assert kjt.offsets().tolist() == [0, *kjt.lengths().cumsum(0).tolist()]
    _, ranks, lengths = data._draw("train", torch.arange(64, 74))
    assert lengths is None
    ids = data._tables.ids(ranks, data._slot_features)
    ends = torch.tensor([1, 5, 2, 7]).cumsum(0).tolist()
    expected = torch.cat([ids[:, e - h : e].reshape(-1) for e, h in zip(ends, [1, 5, 2, 7])])
    assert torch.equal(kjt.values(), expected)


def _draw_on_meta(cfg: SyntheticDataConfig, *, batch_size: int) -> list:
    data = SyntheticCriteo(cfg).to(torch.device("meta"))
    assert data.device.type == "meta"
    return list(
        data.train_batches(batch_size=batch_size, rank=1, world_size=2, first_step=3, num_steps=3)
    )


@pytest.mark.parametrize(
    "cfg",
    [SMALL, dataclasses.replace(SMALL, hotness=[3]), HUGE],
    ids=["single_hot", "multi_hot", "uneven_hotness_huge_tables"],
)
def test_full_bags_draw_without_a_host_sync(cfg: SyntheticDataConfig) -> None:
    # Any .item()/.tolist()/nonzero/boolean mask on the way raises on meta
    # tensors, so drawing at all is the assertion; the shapes are then all static.
    batches = _draw_on_meta(cfg, batch_size=32)
    hotness = cfg.hotness_per_feature()
    for batch in batches:
        kjt = batch.sparse_features
        assert kjt.values().device.type == "meta"
        assert kjt.values().shape == (32 * sum(hotness),)
        assert kjt.lengths().shape == (32 * len(hotness),)
        assert kjt.length_per_key() == [32 * h for h in hotness]
        assert batch.labels.shape == (32,) and batch.labels.device.type == "meta"


def test_batch_and_eval_draw_on_the_source_device_without_a_host_sync() -> None:
    data = SyntheticCriteo(HUGE).to(torch.device("meta"))
    batch = data.batch("eval", 5, 33)
    assert batch.labels.device.type == "meta" and batch.sparse_features.values().numel() == 33 * 15
    assert len(list(data.eval_batches(batch_size=16, rank=0, world_size=2))) == 2


@pytest.mark.parametrize("cfg", [dataclasses.replace(SMALL, hotness=[3]), HUGE], ids=str)
def test_variable_bags_draw_without_a_host_sync(cfg: SyntheticDataConfig) -> None:
    # Bag lengths are drawn on the host too: the per-key totals size the packed
    # ids, so the device never has to be read; they equal the CPU's draw.
    cfg = dataclasses.replace(cfg, variable_hotness=True)
    on_meta = _draw_on_meta(cfg, batch_size=32)
    on_cpu = list(
        SyntheticCriteo(cfg).train_batches(
            batch_size=32, rank=1, world_size=2, first_step=3, num_steps=3
        )
    )
    for meta, cpu in zip(on_meta, on_cpu, strict=True):
        kjt = meta.sparse_features
        assert kjt.values().device.type == "meta"
        assert kjt.length_per_key() == cpu.sparse_features.length_per_key()
        assert kjt.values().shape == cpu.sparse_features.values().shape
    batch = SyntheticCriteo(cfg).to(torch.device("meta")).batch("eval", 5, 33)
    expected = SyntheticCriteo(cfg).batch("eval", 5, 33).sparse_features.length_per_key()
    assert batch.sparse_features.length_per_key() == expected


def test_device_packing_of_variable_bags_equals_the_boolean_mask() -> None:
    # The device path (pack_kept, sized by host totals) run on the CPU's data.
    cfg = dataclasses.replace(HUGE, variable_hotness=True)
    data = SyntheticCriteo(cfg)
    _, ranks, lengths = data._draw("train", torch.arange(100, 164))
    assert lengths is not None
    ids = data._tables.ids(ranks, data._slot_features)
    masked = data._jagged(ids, lengths)
    totals = lengths.sum(0).tolist()
    packed = data._jagged(ids, lengths, totals)
    assert torch.equal(packed.values(), masked.values())
    assert torch.equal(packed.lengths(), masked.lengths())
    assert packed.length_per_key() == masked.length_per_key() == totals
    keep = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.6
    values = torch.arange(1000) * 7
    assert torch.equal(pack_kept(values, keep, int(keep.sum())), values[keep])


def test_meta_tensors_refuse_every_host_read() -> None:
    # What the no-sync tests rely on: each way of reading device data on the host.
    x = torch.arange(6, device="meta")
    for read in (
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: bool(x[0]),
        lambda: x.nonzero(),
        lambda: x[x > 2],
        lambda: torch.unique(x),
        lambda: x.to("cpu"),
    ):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
