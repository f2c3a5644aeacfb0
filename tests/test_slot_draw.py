"""The compiled slot draw (``trainer.data.slot_draw``) against the staged torch draw.

Every config below is drawn both ways on the same samples, and every output of
``SyntheticSource._draw_with_head`` (dense features, ranks, bag lengths, head
positions, tail indices) and of a whole batch (ids, labels, dense features) must
be equal bit for bit: tiny tables, tables past ``zipf.EXACT_RANKS`` (tail
ranks), uneven and variable bags, and exponents 0.7 (the guess through exp and
log), 1 (exp alone) and 1.2 (an integer power). In these draws 0.2-0.8 % of
the guesses miss and step to a neighbour; a far miss, which a binary search
settles, is checked on ``_search_near`` directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch

from trainer.data import SyntheticCriteo, SyntheticDataConfig, slot_draw

pytest.importorskip("numba")

T = TypeVar("T")

BASE = SyntheticDataConfig(
    cardinalities=[1, 2, 7, 50, 1000, 30000], num_dense=3, num_eval_samples=64, num_interactions=2
)
CONFIGS = {
    "single-hot, tiny tables": BASE,
    "tails, uneven bags": dataclasses.replace(
        BASE,
        cardinalities=[7, 40_000_000, 300, 100_000],
        hotness=[1, 5, 2, 7],
        interaction_max_cardinality=40_000_000,
    ),
    "variable bags, exponent 1": dataclasses.replace(
        BASE, hotness=[3], variable_hotness=True, zipf_exponent=1.0
    ),
    "exponent 0.7, tails": dataclasses.replace(
        BASE,
        cardinalities=[3, 70_000, 2_000_000],
        hotness=[4],
        zipf_exponent=0.7,
        interaction_max_cardinality=2_000_000,
    ),
}


def _both_ways(monkeypatch: pytest.MonkeyPatch, draw: Callable[[], T]) -> tuple[T, T]:
    monkeypatch.setattr(slot_draw, "ENABLED", False)
    staged = draw()
    monkeypatch.setattr(slot_draw, "ENABLED", True)
    return staged, draw()


def _assert_equal(staged: object, fused: object) -> None:
    if isinstance(staged, torch.Tensor):
        assert staged.dtype == fused.dtype and staged.shape == fused.shape
        assert torch.equal(staged, fused)
    elif staged is None:
        assert fused is None
    else:
        for a, b in zip(staged, fused, strict=True):
            _assert_equal(a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_draw_is_the_staged_draw(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = SyntheticCriteo(CONFIGS[name])
    # Far-off indices too: the hash of the sample index covers all 64 bits.
    indices = torch.cat([torch.arange(5000), torch.arange(2**40, 2**40 + 3000)])
    assert indices.numel() * len(data._slot_features) >= slot_draw.MIN_SLOTS
    drew: list[bool] = []  # whether each call drew fused (None: staged)

    def spy(*args: object) -> object:
        out = real(*args)
        drew.append(out is not None)
        return out

    real = slot_draw.draw_slots
    monkeypatch.setattr(slot_draw, "draw_slots", spy)
    staged, fused = _both_ways(monkeypatch, lambda: data._draw_with_head("train", indices))
    assert drew == [False, True]  # the second call really drew fused
    _assert_equal(staged, fused)
    ranks, tail_at = fused[1], fused[4]
    if max(CONFIGS[name].cardinalities) > 65536:
        assert tail_at.numel() > 0, "the config was meant to reach the tail"
    assert int(ranks.max()) < max(CONFIGS[name].cardinalities)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_batches_are_the_staged_batches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = SyntheticCriteo(CONFIGS[name])

    def batches() -> list[torch.Tensor]:
        out = []
        for batch in data.train_batches(
            batch_size=1024, rank=1, world_size=2, first_step=3, num_steps=6
        ):
            kjt = batch.sparse_features
            out += [kjt.values(), kjt.lengths(), batch.labels, batch.dense_features]
        subset = torch.randperm(20_000, generator=torch.Generator().manual_seed(0))[:6000]
        picked = data.batch_at("eval", subset[subset < 64])
        out += [picked.labels, data.batch_at("train", subset).sparse_features.values()]
        return out

    staged, fused = _both_ways(monkeypatch, batches)
    _assert_equal(staged, fused)


def test_small_draws_stay_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SyntheticCriteo(BASE)
    indices = torch.arange(16)
    assert (
        slot_draw.draw_slots(data._tables, 5, indices, data._slot_features, data._slot_positions)
        is None
    )
    monkeypatch.setattr(slot_draw, "ENABLED", False)
    big = torch.arange(1 << 14)
    assert (
        slot_draw.draw_slots(data._tables, 5, big, data._slot_features, data._slot_positions)
        is None
    )


def test_search_near_is_the_binary_search() -> None:
    """A missed guess, near or far, ends where ``searchsorted`` does, ties included."""
    from trainer.data.slot_draw_kernel import _search_near

    gen = torch.Generator().manual_seed(0)
    steps = torch.rand(500, generator=gen, dtype=torch.float64)
    steps[::7] = 0.0  # runs of equal entries, as a CDF has where probabilities vanish
    cdf = torch.cat([torch.tensor([-math.inf]), steps.cumsum(0), torch.tensor([math.inf])])
    cdf_np = cdf.numpy()
    targets = torch.cat([torch.rand(300, generator=gen, dtype=torch.float64) * 260, cdf[1:-1]])
    for x in targets.tolist():
        want = int(np.searchsorted(cdf_np, x)) - 1
        for guess in {0, max(want - 3, 0), want + 1, min(want + 40, 500), 500}:
            assert _search_near(cdf_np, guess, x) == want, (x, guess)


def test_without_numba_the_draw_is_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without numba draws in stages: the same batch, no error."""
    import sys

    data = SyntheticCriteo(BASE)
    fused = data.batch("train", 0, 4096)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "trainer.data.slot_draw_kernel")
    monkeypatch.setattr(slot_draw, "_kernel", None)
    assert (
        slot_draw.draw_slots(
            data._tables, 5, torch.arange(4096), data._slot_features, data._slot_positions
        )
        is None
    )
    staged = data.batch("train", 0, 4096)
    assert torch.equal(staged.sparse_features.values(), fused.sparse_features.values())
    assert torch.equal(staged.labels, fused.labels)


def test_a_numba_that_cannot_compile_leaves_the_draw_staged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """numba raises at import where it has no writable cache directory: the draw
    goes on in stages, with a warning that says how to turn the loop back on."""
    import builtins
    import sys

    real_import = builtins.__import__

    def failing(name: str, *args: object, **kwargs: object) -> object:
        if name == "trainer.data.slot_draw_kernel":
            raise RuntimeError("cannot cache function 'draw_kernel': no locator available")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "trainer.data.slot_draw_kernel")
    monkeypatch.setattr(builtins, "__import__", failing)
    monkeypatch.setattr(slot_draw, "_kernel", None)
    data = SyntheticCriteo(BASE)
    with caplog.at_level("WARNING", logger="trainer.data.slot_draw"):
        assert not slot_draw.fused_available()
        batch = data.batch("train", 0, 4096)
    assert "NUMBA_CACHE_DIR" in caplog.text and "no locator" in caplog.text
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(slot_draw, "ENABLED", False)
    assert torch.equal(batch.labels, data.batch("train", 0, 4096).labels)


def test_dense_normals_are_rngs_normals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense features: hashes and uniforms by the compiled loop, Box-Muller in
    torch, ``rng.normal``'s bits (far-off sample indices and keys of either sign)."""
    from trainer.data.rng import normal, stream_key

    kernels = slot_draw._load()
    calls = []

    def counted(*args: object) -> None:
        calls.append(1)
        kernels.normal_uniforms(*args)

    spied = type(kernels)(draw=kernels.draw, normal_uniforms=counted)
    monkeypatch.setattr(slot_draw, "_load", lambda: spied)
    indices = torch.cat(
        [torch.arange(3000), torch.arange(2**40, 2**40 + 2000), torch.tensor([2**63 - 1])]
    )
    columns = torch.arange(13)
    for key in (stream_key(0, "train", "dense"), -5, 2**62 + 7):
        expected = normal(key, indices.unsqueeze(1), columns)
        got = slot_draw.dense_normals(key, indices, columns)
        assert got.dtype == torch.float64 and got.shape == (indices.numel(), 13)
        assert torch.equal(got, expected)
    assert len(calls) == 3
    # A handful of samples stays in torch (below the size worth a call).
    assert torch.equal(
        slot_draw.dense_normals(3, torch.arange(4), columns),
        normal(3, torch.arange(4).unsqueeze(1), columns),
    )
    assert len(calls) == 3


def test_slot_ids_are_the_tables_bijections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks to ids by the compiled loop: ``ZipfTables.ids``'s integers, on tables up
    to 40M rows (products near 2**51), and really by the loop."""
    data = SyntheticCriteo(CONFIGS["tails, uneven bags"])
    tables, features = data._tables, data._slot_features
    kernels = slot_draw._load()
    calls = []

    def counted(*args: object) -> None:
        calls.append(1)
        kernels.ids(*args)

    spied = type(kernels)(draw=kernels.draw, normal_uniforms=kernels.normal_uniforms, ids=counted)
    monkeypatch.setattr(slot_draw, "_load", lambda: spied)
    cards = torch.tensor(CONFIGS["tails, uneven bags"].cardinalities)[features]
    gen = torch.Generator().manual_seed(0)
    ranks = (torch.rand(3000, len(features), generator=gen, dtype=torch.float64) * cards).long()
    ranks[0] = cards - 1  # the last rank of every table
    got = slot_draw.slot_ids(tables, ranks, features)
    assert torch.equal(got, tables.ids(ranks, features))
    assert calls == [1]
    assert bool((got < cards).all()) and bool((got >= 0).all())
