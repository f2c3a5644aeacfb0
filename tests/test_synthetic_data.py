"""Synthetic data: determinism, rank slicing, layout, and the calibration of the defaults."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data import (
    SyntheticCriteo,
    SyntheticDataConfig,
    eval_batches,
    eval_slices,
    rank_batches,
)
from trainer.data.rng import mix64
from trainer.data.zipf import EXACT_RANKS, ZipfTables

SMALL = SyntheticDataConfig(
    cardinalities=[7, 50, 1000, 30000], num_dense=3, num_eval_samples=4096, num_interactions=2
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # On a shared 2-core machine, intra-op threads spin against each other and
    # slow these small kernels (and sklearn's OpenMP loops) several times over.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def default_data() -> SyntheticCriteo:
    return SyntheticCriteo(SyntheticDataConfig())


def assert_batches_equal(a: Batch, b: Batch) -> None:
    torch.testing.assert_close(a.dense_features, b.dense_features, rtol=0, atol=0)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    torch.testing.assert_close(
        a.sparse_features.lengths(), b.sparse_features.lengths(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        a.sparse_features.values(), b.sparse_features.values(), rtol=0, atol=0
    )


def concat_batches(batches: list[Batch]) -> Batch:
    """Sample-wise concatenation, regrouping the feature-major jagged values."""
    keys = batches[0].sparse_features.keys()
    per_key = [b.sparse_features.to_dict() for b in batches]
    values = torch.cat([torch.cat([d[k].values() for d in per_key]) for k in keys])
    lengths = torch.cat([torch.cat([d[k].lengths() for d in per_key]) for k in keys])
    return Batch(
        dense_features=torch.cat([b.dense_features for b in batches]),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=values, lengths=lengths
        ),
        labels=torch.cat([b.labels for b in batches]),
    )


def test_mixer_matches_the_splitmix64_reference() -> None:
    # First output of splitmix64 seeded with 0 (Steele et al.; Vigna's reference code).
    expected = 0xE220A8397B1DCDAF - (1 << 64)
    assert int(mix64(torch.tensor([0]))[0]) == expected


def test_same_seed_same_batch_other_seed_differs() -> None:
    first = SyntheticCriteo(SMALL).batch("train", 1000, 256)
    assert_batches_equal(first, SyntheticCriteo(SMALL).batch("train", 1000, 256))
    other = SyntheticCriteo(dataclasses.replace(SMALL, seed=1)).batch("train", 1000, 256)
    assert not torch.equal(first.dense_features, other.dense_features)
    assert not torch.equal(first.sparse_features.values(), other.sparse_features.values())


def test_train_and_eval_streams_differ() -> None:
    data = SyntheticCriteo(SMALL)
    assert not torch.equal(
        data.batch("train", 0, 64).dense_features, data.batch("eval", 0, 64).dense_features
    )


def test_samples_do_not_depend_on_batching() -> None:
    data = SyntheticCriteo(SMALL)
    whole = data.batch("train", 500, 300)
    parts = [
        data.batch("train", 500, 100),
        data.batch("train", 600, 50),
        data.batch("train", 650, 150),
    ]
    assert_batches_equal(concat_batches(parts), whole)


def test_rank_slices_are_disjoint_and_independent_of_world_size() -> None:
    data = SyntheticCriteo(SMALL)
    step, batch_size = 3, 64
    [single] = rank_batches(
        data,
        "train",
        batch_size=2 * batch_size,
        rank=0,
        world_size=1,
        num_batches=1,
        first_batch=step,
    )
    per_rank = [
        next(
            rank_batches(
                data,
                "train",
                batch_size=batch_size,
                rank=r,
                world_size=2,
                num_batches=1,
                first_batch=step,
            )
        )
        for r in range(2)
    ]
    assert not torch.equal(per_rank[0].dense_features, per_rank[1].dense_features)
    assert_batches_equal(concat_batches(per_rank), single)


def test_rank_batches_walk_consecutive_steps() -> None:
    data = SyntheticCriteo(SMALL)
    batches = list(
        rank_batches(
            data, "train", batch_size=32, rank=1, world_size=3, num_batches=2, first_batch=5
        )
    )
    assert len(batches) == 2
    assert_batches_equal(batches[1], data.batch("train", (6 * 3 + 1) * 32, 32))


@pytest.mark.parametrize(("num_samples", "world_size"), [(4096, 2), (1000, 3), (100, 4)])
def test_eval_slices_cover_the_eval_set_evenly(num_samples: int, world_size: int) -> None:
    slices = [
        eval_slices(num_samples, batch_size=64, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    # Same number of batches and the same size at each step on every rank.
    assert len({tuple(size for _, size in s) for s in slices}) == 1
    covered = sorted(i for s in slices for start, size in s for i in range(start, start + size))
    assert covered == list(range(num_samples - num_samples % world_size))


def test_eval_batches_match_their_slices() -> None:
    data = SyntheticCriteo(dataclasses.replace(SMALL, num_eval_samples=1000))
    batches = list(eval_batches(data, batch_size=128, rank=2, world_size=3))
    slices = eval_slices(1000, batch_size=128, rank=2, world_size=3)
    assert [b.labels.numel() for b in batches] == [size for _, size in slices]
    assert_batches_equal(batches[-1], data.batch("eval", *slices[-1]))


def test_batch_layout_and_dtypes() -> None:
    data = SyntheticCriteo(SMALL)
    batch = data.batch("train", 0, 512)
    assert batch.dense_features.shape == (512, 3) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (512,) and batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) == {0.0, 1.0}
    kjt = batch.sparse_features
    assert kjt.keys() == ["cat_0", "cat_1", "cat_2", "cat_3"] == data.feature_names
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
    assert torch.all(kjt.lengths() == 1)
    for key, cardinality in zip(kjt.keys(), SMALL.cardinalities, strict=True):
        ids = kjt[key].values()
        assert ids.numel() == 512 and ids.min() >= 0 and ids.max() < cardinality


def test_hot_ids_are_scattered_over_the_table() -> None:
    ids = SyntheticCriteo(SMALL).batch("train", 0, 8192).sparse_features["cat_3"].values()
    counts = torch.bincount(ids, minlength=30000)
    top = torch.topk(counts, 10).indices
    # Row-wise shards split the id range into blocks: the hot rows must not share one.
    assert top.max() - top.min() > 30000 // 2
    assert 0 not in top.tolist()


def test_multi_hot_lengths_and_prefix_property() -> None:
    fixed_cfg = dataclasses.replace(SMALL, hotness=[1, 3, 5, 2])
    fixed = SyntheticCriteo(fixed_cfg).batch("train", 0, 400).sparse_features
    variable = SyntheticCriteo(dataclasses.replace(fixed_cfg, variable_hotness=True)).batch(
        "train", 0, 400
    )
    for key, hot, cardinality in zip(fixed.keys(), [1, 3, 5, 2], SMALL.cardinalities, strict=True):
        assert torch.all(fixed[key].lengths() == hot)
        lengths = variable.sparse_features[key].lengths()
        assert lengths.min() >= 1 and lengths.max() <= hot
        if hot > 1:
            assert set(lengths.tolist()) == set(range(1, hot + 1))
        values = variable.sparse_features[key].values()
        assert values.max() < cardinality
        # A shorter bag holds the first ids of the full bag: ids never depend on the length.
        full = fixed[key].values().view(400, hot)
        mask = torch.arange(hot) < lengths.unsqueeze(1)
        torch.testing.assert_close(values, full[mask], rtol=0, atol=0)


def test_batch_feeds_an_embedding_bag_collection() -> None:
    cfg = dataclasses.replace(SMALL, hotness=[2], variable_hotness=True)
    data = SyntheticCriteo(cfg)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{name}", embedding_dim=4, num_embeddings=rows, feature_names=[name]
            )
            for name, rows in zip(data.feature_names, data.cardinalities, strict=True)
        ]
    )
    pooled = ebc(data.batch("train", 0, 16).sparse_features)
    assert pooled.values().shape == (16, 4 * len(data.feature_names))


def test_zipf_sampler_follows_its_law() -> None:
    tables = ZipfTables([20, 3 << 16], exponent=1.2, seed=0)
    u = torch.rand(200_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ranks = tables.ranks(u, torch.tensor([0, 1]))
    assert ranks.min() >= 0 and ranks[:, 0].max() < 20 and ranks[:, 1].max() < 3 << 16
    freq = torch.bincount(ranks[:, 0], minlength=20).double() / u.shape[0]
    torch.testing.assert_close(freq, tables.head_probabilities(0), atol=4e-3, rtol=0)
    # The huge table's tail beyond the tabulated head is sampled with the right mass.
    tail_share = (ranks[:, 1] >= EXACT_RANKS).double().mean()
    expected = 1.0 - tables.head_probabilities(1).sum()
    assert abs(float(tail_share) - float(expected)) < 5e-3
    # ... and spread like the law: the first doubling of the tail holds its share.
    a, b = EXACT_RANKS + 0.5, 2 * EXACT_RANKS + 0.5
    first_doubling = tables.head_probabilities(1)[0] * (a**-0.2 - b**-0.2) / 0.2
    observed = ((ranks[:, 1] >= EXACT_RANKS) & (ranks[:, 1] < 2 * EXACT_RANKS)).double().mean()
    assert abs(float(observed) - float(first_doubling)) < 3e-3


def test_tail_ranks_match_a_float64_reference() -> None:
    cardinality, s = 40_000_000, 1.2
    tables = ZipfTables([cardinality], exponent=s, seed=0)
    head = tables.head_probabilities(0)
    total_mass, head_fraction = 1.0 / float(head[0]), float(head.sum())
    u = torch.linspace(head_fraction + 1e-9, 1.0 - 1e-12, 101, dtype=torch.float64)
    lo = EXACT_RANKS + 0.5
    expected = []
    for x in u.tolist():
        mass = (x - head_fraction) * total_mass
        continuous = (lo ** (1 - s) + (1 - s) * mass) ** (1 / (1 - s))
        expected.append(min(max(math.floor(continuous + 0.5), EXACT_RANKS + 1), cardinality) - 1)
    assert tables.ranks(u, torch.tensor(0)).tolist() == expected


def test_scales_are_the_standard_deviations_of_the_logit_terms() -> None:
    cfg = SyntheticDataConfig()
    logits = torch.logit(SyntheticCriteo(cfg).click_probability("train", 0, 50_000))
    expected = (
        cfg.dense_scale**2
        + cfg.dense_nonlinear_scale**2
        + cfg.first_order_scale**2
        + cfg.interaction_scale**2
    ) ** 0.5
    assert abs(float(logits.std()) / expected - 1.0) < 0.05
    assert abs(float(logits.mean()) - cfg.base_logit) < 0.05


def test_labels_are_drawn_from_the_click_probability() -> None:
    data = SyntheticCriteo(SMALL)
    probs = data.click_probability("train", 0, 50_000)
    labels = data.batch("train", 0, 50_000).labels.double()
    assert abs(float(labels.mean() - probs.mean())) < 0.005
    confident = probs > 0.5
    assert abs(float(labels[confident].mean() - probs[confident].mean())) < 0.02


def test_default_calibration(default_data: SyntheticCriteo) -> None:
    labels = default_data.batch("eval", 0, default_data.num_eval_samples).labels
    assert 0.03 <= float(labels.mean()) <= 0.25
    assert 0.75 <= default_data.oracle_auc() <= 0.85


def one_hot_features(
    data: SyntheticCriteo, split: str, size: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Dense features, their squares, and one-hot ids: everything a linear model can use."""
    batch = data.batch(split, 0, size)
    dense = batch.dense_features.numpy()
    offsets = np.cumsum([0, *data.cardinalities[:-1]])
    kjt = batch.sparse_features
    columns = np.stack(
        [kjt[k].values().numpy() + offsets[f] for f, k in enumerate(data.feature_names)], 1
    )
    rows = np.repeat(np.arange(size), len(data.feature_names))
    one_hot = sp.csr_matrix(
        (np.ones(columns.size), (rows, columns.ravel())), shape=(size, sum(data.cardinalities))
    )
    return sp.hstack(
        [sp.csr_matrix(np.hstack([dense, dense**2])), one_hot]
    ).tocsr(), batch.labels.numpy()


# 100 lbfgs steps land within ~0.005 AUC of the converged fit, far inside the margin.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_interactions_defeat_a_linear_model(default_data: SyntheticCriteo) -> None:
    x_train, y_train = one_hot_features(default_data, "train", 60_000)
    num_eval = 32768
    x_eval, y_eval = one_hot_features(default_data, "eval", num_eval)
    linear = LogisticRegression(C=0.03, max_iter=100).fit(x_train, y_train)
    linear_auc = roc_auc_score(y_eval, linear.predict_proba(x_eval)[:, 1])
    oracle_auc = roc_auc_score(y_eval, default_data.click_probability("eval", 0, num_eval).numpy())
    assert linear_auc > 0.6, "the linear model should still learn the dense and first-order effects"
    assert linear_auc <= oracle_auc - 0.02


def test_too_few_qualifying_pairs_plant_fewer(caplog: pytest.LogCaptureFixture) -> None:
    # Only cat_0 and cat_1 are small enough to anchor a pair, cat_3 is too large.
    cfg = dataclasses.replace(SMALL, num_interactions=5)
    with caplog.at_level("WARNING", logger="trainer.data.planted"):
        data = SyntheticCriteo(cfg)
    assert data.interaction_pairs == [(0, 1), (0, 2), (1, 2)]
    assert "data.num_interactions=5" in caplog.text


def test_invalid_configs_name_the_key() -> None:
    from trainer.config.validate import validate_synthetic  # the one place that checks config

    with pytest.raises(ValueError, match="data.hotness"):
        validate_synthetic(dataclasses.replace(SMALL, hotness=[1, 2]))
    with pytest.raises(ValueError, match="data.cardinalities"):
        validate_synthetic(dataclasses.replace(SMALL, cardinalities=[10, 0]))
    with pytest.raises(ValueError, match="data.num_interactions"):
        validate_synthetic(dataclasses.replace(SMALL, num_interactions=-1))
    with pytest.raises(ValueError, match="num_eval_samples"):
        SyntheticCriteo(SMALL).batch("eval", 4000, 100)
    with pytest.raises(ValueError, match="split"):
        SyntheticCriteo(SMALL).batch("test", 0, 1)


# --- any scale (issue 13) ----------------------------------------------------------


def test_tables_above_every_cap_plant_pairs_with_the_smallest_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every table above data.interaction_max_cardinality: no pair qualifies. This
    # used to crash (one_hot on an empty tensor); now the smallest table pairs up.
    cfg = dataclasses.replace(
        SMALL, cardinalities=[300_000, 100_000, 200_000, 150_000], num_interactions=2
    )
    with caplog.at_level("WARNING", logger="trainer.data.planted"):
        data = SyntheticCriteo(cfg)
    assert data.interaction_pairs == [(1, 3), (1, 2)] or data.interaction_pairs == [(1, 2), (1, 3)]
    assert "data.interaction_max_cardinality=20000" in caplog.text
    batch = data.batch("train", 0, 512)
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 < float(batch.labels.mean()) < 0.5
    assert int(batch.sparse_features.values().max()) < 300_000


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(SMALL, num_interactions=0),
        dataclasses.replace(SMALL, cardinalities=[100_000]),
        dataclasses.replace(SMALL, cardinalities=[5]),
    ],
    ids=["no-interactions", "one-large-table", "one-small-table"],
)
def test_configs_without_pairs_generate(cfg: SyntheticDataConfig) -> None:
    data = SyntheticCriteo(cfg)
    assert data.interaction_pairs == []
    batch = data.batch("train", 0, 64)
    assert batch.labels.shape == (64,)
    assert_batches_equal(batch, SyntheticCriteo(cfg).batch("train", 0, 64))


def test_mlperf_dcnv2_shapes_generate() -> None:
    # conf/experiment/mlperf_dcnv2.yaml: tables up to 40M rows, 214 ids per sample.
    import time

    import yaml

    with open("conf/experiment/mlperf_dcnv2.yaml") as f:
        data_cfg = yaml.safe_load(f)["data"]
    cfg = SyntheticDataConfig(**data_cfg)
    assert sum(cfg.hotness) == 214
    data = SyntheticCriteo(cfg)
    data.batch("train", 0, 8)  # warm-up
    began = time.perf_counter()
    batch = data.batch("train", 1024, 256)
    elapsed_s = time.perf_counter() - began
    kjt = batch.sparse_features
    assert int(kjt.lengths().sum()) == 214 * 256
    for name, values in kjt.to_dict().items():
        rows = cfg.cardinalities[int(name.split("_")[1])]
        assert 0 <= int(values.values().min()) and int(values.values().max()) < rows
    # The 40M-row tables reach their tail: ids far beyond the exactly tabulated head.
    assert int(kjt["cat_0"].values().max()) > EXACT_RANKS
    # One CPU thread on a shared machine: ~40 ms; a generous bound against regressions.
    assert elapsed_s < 5.0, elapsed_s


def test_zipf_and_planted_move_devices_without_changing_draws() -> None:
    data = SyntheticCriteo(SMALL)
    tables = ZipfTables(SMALL.cardinalities, exponent=1.2, seed=0)
    u = torch.rand(32, 4, dtype=torch.float64)
    which = torch.arange(4)
    before = tables.ids(tables.ranks(u, which), which)
    assert tables.to("cpu") is tables
    assert torch.equal(tables.ids(tables.ranks(u, which), which), before)
    planted = data._planted
    assert planted.to(torch.device("cpu")) is planted


def _reference_jagged(data: SyntheticCriteo, split: str, start: int, size: int) -> Batch:
    """The straightforward construction: one slice per feature, then concatenated."""
    _, ranks, lengths = data._draw(split, torch.arange(start, start + size))
    ids = data._tables.ids(ranks, data._slot_features)
    if lengths is None:
        mask = torch.ones_like(ranks, dtype=torch.bool)
    else:
        mask = data._slot_positions < lengths[:, data._slot_features]
    ends = torch.tensor(data.hotness).cumsum(0).tolist()
    values = [ids[:, e - h : e][mask[:, e - h : e]] for e, h in zip(ends, data.hotness)]
    lengths = [mask[:, e - h : e].sum(1, dtype=torch.int32) for e, h in zip(ends, data.hotness)]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=data.feature_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    batch = data.batch(split, start, size)
    return Batch(dense_features=batch.dense_features, sparse_features=sparse, labels=batch.labels)


INPUT_PATH_CONFIGS = {
    "single_hot": dataclasses.replace(SMALL, num_eval_samples=64),
    "multi_hot": dataclasses.replace(SMALL, hotness=[3], num_eval_samples=64),
    "variable_hotness": dataclasses.replace(
        SMALL, hotness=[1, 4, 2, 3], variable_hotness=True, num_eval_samples=64
    ),
    # A table past zipf.EXACT_RANKS: tail ranks and hashed first-order effects.
    "huge_table": dataclasses.replace(
        SMALL,
        cardinalities=[7, 40_000_000, 300],
        hotness=[1, 5, 2],
        variable_hotness=True,
        num_eval_samples=64,
    ),
}


@pytest.mark.parametrize("name", list(INPUT_PATH_CONFIGS))
def test_chunked_train_batches_equal_single_step_batches(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.data.synthetic as synthetic

    # Chunks of 3 steps, the last one partial: 7 steps from step 2.
    data = SyntheticCriteo(INPUT_PATH_CONFIGS[name])
    monkeypatch.setattr(synthetic, "TRAIN_CHUNK_SLOTS", 3 * 40 * len(data._slot_features))
    got = list(data.train_batches(batch_size=40, rank=1, world_size=3, first_step=2, num_steps=7))
    assert len(got) == 7
    for step, batch in zip(range(2, 9), got, strict=True):
        start = (step * 3 + 1) * 40
        assert_batches_equal(batch, data.batch("train", start, 40))
        assert_batches_equal(batch, _reference_jagged(data, "train", start, 40))
        kjt = batch.sparse_features
        assert kjt.stride() == 40
        assert kjt.length_per_key() == [int(t.sum()) for t in kjt.lengths().split(40)]


def test_batches_equal_the_per_feature_reference_on_eval() -> None:
    for cfg in INPUT_PATH_CONFIGS.values():
        data = SyntheticCriteo(cfg)
        assert_batches_equal(data.batch("eval", 5, 33), _reference_jagged(data, "eval", 5, 33))


def test_first_order_lookup_equals_hashing() -> None:
    data = SyntheticCriteo(INPUT_PATH_CONFIGS["huge_table"])
    planted = data._planted
    features = torch.tensor([0, 1, 1, 1, 2])
    ranks = torch.tensor([6, 0, EXACT_RANKS - 1, EXACT_RANKS + 12345, 299])
    hashed = planted._centre_first_order(features, planted._raw_first_order(features, ranks))
    torch.testing.assert_close(planted.first_order(features, ranks), hashed, rtol=0, atol=0)
