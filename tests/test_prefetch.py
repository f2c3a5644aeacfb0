"""The prefetching producer: same batches, same order, errors and shutdown; the
trainer's input ahead of the step (``trainer.prefetch``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer.data import SyntheticCriteo, SyntheticDataConfig, rank_batches
from trainer.data.prefetch import Prefetcher, _pinned, input_ahead

CFG = SyntheticDataConfig(
    cardinalities=[7, 50, 1000, 30000], num_dense=3, num_eval_samples=256, hotness=[1, 3, 1, 2]
)


def _batches(seed: int, rank: int = 1) -> Iterator:
    data = SyntheticCriteo(SyntheticDataConfig(**{**CFG.__dict__, "seed": seed}))
    return rank_batches(data, "train", batch_size=64, rank=rank, world_size=2, num_batches=12)


def _flat(batch) -> list[torch.Tensor]:
    kjt = batch.sparse_features
    return [batch.dense_features, batch.labels, kjt.values(), kjt.lengths()]


@pytest.mark.parametrize("depth", [1, 3])
def test_same_batches_in_the_same_order(depth: int) -> None:
    direct = [_flat(b) for b in _batches(seed=3)]
    with Prefetcher(_batches(seed=3), depth=depth, num_threads=1) as prefetched:
        ahead = [_flat(b) for b in prefetched]
    assert len(ahead) == len(direct) == 12
    for a, b in zip(ahead, direct, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # Deterministic by seed: another seed gives other batches.
    other = [_flat(b) for b in Prefetcher(_batches(seed=4))]
    assert not torch.equal(other[0][2], direct[0][2])


def test_source_errors_are_raised_by_next_at_their_position() -> None:
    def failing() -> Iterator[int]:
        yield 0
        yield 1
        raise KeyError("data.dir has no shard 7")

    prefetched = Prefetcher(failing(), depth=4)
    assert next(prefetched) == 0
    assert next(prefetched) == 1
    with pytest.raises(KeyError, match="shard 7"):
        next(prefetched)
    with pytest.raises(StopIteration):
        next(prefetched)


def test_transform_runs_ahead_on_the_producer_thread() -> None:
    names = []

    def tag(x: int) -> int:
        names.append(threading.current_thread().name)
        return x * 10

    assert list(Prefetcher(range(5), transform=tag)) == [0, 10, 20, 30, 40]
    assert set(names) == {"shardrec-prefetch"}


def test_close_stops_a_producer_blocked_on_a_full_queue() -> None:
    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    prefetched = Prefetcher(endless(), depth=2)
    assert next(prefetched) == 0
    time.sleep(0.2)  # the producer fills the queue and waits
    began = time.perf_counter()
    prefetched.close()
    assert time.perf_counter() - began < 2.0
    assert not prefetched._thread.is_alive()
    # consumed 1, queued 2, one waiting to be put, one more made as close() drains.
    assert len(produced) <= 5, "a bounded queue: at most depth + 3 items made"
    with pytest.raises(StopIteration):
        next(prefetched)


def test_overlaps_a_slow_source_with_a_slow_consumer() -> None:
    def slow(n: int) -> Iterator[int]:
        for i in range(n):
            time.sleep(0.05)
            yield i

    began = time.perf_counter()
    for _ in Prefetcher(slow(8), depth=2):
        time.sleep(0.05)
    overlapped_s = time.perf_counter() - began
    # Serial would be 8 * (0.05 + 0.05) = 0.8 s; overlapped about 0.45 s.
    assert overlapped_s < 0.7, overlapped_s


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth=0"):
        Prefetcher(range(3), depth=0)


def test_input_ahead_auto_is_inline_on_the_cpu_and_pinned_ahead_for_a_gpu() -> None:
    direct = [_flat(b) for b in _batches(seed=3)]
    with input_ahead(_batches(seed=3), mode="auto", device=torch.device("cpu")) as inline:
        assert not isinstance(inline, Prefetcher), "a producer would compete with the step"
        got = [_flat(b) for b in inline]
    assert all(torch.equal(x, y) for a, b in zip(got, direct, strict=True) for x, y in zip(a, b))
    with input_ahead(_batches(seed=3), mode="on", device=torch.device("cpu")) as ahead:
        assert isinstance(ahead, Prefetcher) and ahead._transform is None
        got = [_flat(b) for b in ahead]
    assert all(torch.equal(x, y) for a, b in zip(got, direct, strict=True) for x, y in zip(a, b))
    # Host batches for a GPU: ahead, through pin_memory on the producer thread (the
    # GPU tier runs it; without CUDA the decision alone is checked).
    with input_ahead(_batches(seed=3), mode="auto", device=torch.device("cuda")) as ahead:
        assert isinstance(ahead, Prefetcher) and ahead._transform is _pinned
    with pytest.raises(ValueError, match="trainer.prefetch='always'"):
        with input_ahead(iter([]), mode="always", device=torch.device("cpu")):
            pass


def train_from_shards(compose_cfg, tmp_path: Path, modes: tuple[str, ...], *overrides: str) -> dict:
    """Prepares a small table (multi-hot, a per-epoch shuffle) once, then trains 40 steps
    from its shards with each ``trainer.prefetch`` mode, in this process: the summaries
    by mode; each run's directory is ``tmp_path / mode``."""
    from tests.test_prepare_shapes import _write
    from tests.test_prepare_table import events, table_cfg
    from trainer.config.schema import to_config
    from trainer.prepare import prepare
    from trainer.train import train

    c = table_cfg(tmp_path, [_write(events(600), tmp_path / "a.parquet")], eval_fraction=0.2)
    prepare(c, progress=False)
    runs = {}
    for mode in modes:
        cfg = compose_cfg(
            ["data=table", f"data.dir={c.dir}", "trainer=smoke", f"trainer.prefetch={mode}"]
            + ["trainer.batch_size=32", "trainer.num_steps=40", "trainer.eval_every_steps=20"]
            + ["trainer.plot=false", "trainer.progress_bar=false", *overrides]
        )
        runs[mode] = train(to_config(cfg), run_dir=tmp_path / mode)
    return runs


def test_training_from_shards_is_the_same_with_the_batches_built_ahead(
    compose_cfg, tmp_path: Path
) -> None:
    """The shard-input determinism check: trained from prepared shards (multi-hot,
    a per-epoch shuffle), the losses and evals with the producer ahead are the
    inline run's, bit for bit."""
    records = {}
    for mode in train_from_shards(compose_cfg, tmp_path, ("off", "on")):
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        keep = ("step", "train_loss", "auc", "logloss", "calibration")
        records[mode] = [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]
    assert sum("train_loss" in r for r in records["off"]) >= 2
    assert sum("auc" in r for r in records["off"]) == 2
    assert records["on"] == records["off"]
