"""The compiled CPU backward (``sharding/tbe_cpu.py``) against FBGEMM's, bit for bit.

Two table-batched kernels start from the same weights; one keeps FBGEMM's backward,
the other gets the compiled one. After every step the pooled outputs, the weights
and the row-wise Adagrad accumulators must be equal bit for bit: widths that fill
FBGEMM's eight float lanes and widths that leave a remainder (4, 12, 24), tables of
7 rows to 2**22 + 3 (one to three radix passes), heavy-tailed, uniform and repeated
ids, empty bags, and a learning rate changed in flight; with one thread and with
the tables in three groups at once. Then the cases left to FBGEMM, a bad id, and
the trainer: in one process, the same metrics with the compiled backward on and
off, and the compiled one really used; on 2 gloo ranks, the same metrics and
checkpoint tensors. Bit for bit where FBGEMM runs its AVX2 Adagrad kernel (x86
CPUs with AVX2); elsewhere to 1e-4 (``EXACT``).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from sharding import tbe_cpu
from tests.distributed import fork_trainer
from tests.test_checkpoint import _records, _tensors
from tests.test_train_e2e import TINY

pytest.importorskip("numba")

# (rows, dim) per table; one feature per table.
TABLES = [(7, 4), (50, 12), (3000, 16), (100_000, 24), (40, 64), (2**22 + 3, 4)]
BATCH = 64


def _tbe(tables: list[tuple[int, int]], **kwargs: object) -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in tables],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.05,
        eps=1e-8,
        **{"pooling_mode": PoolingMode.SUM, **kwargs},
    )


def _pair(tables: list[tuple[int, int]], **kwargs: object):
    fbgemm, compiled = _tbe(tables, **kwargs), _tbe(tables, **kwargs)
    assert torch.equal(fbgemm.weights_host, compiled.weights_host)
    assert tbe_cpu.compiled_case(compiled)
    compiled.__class__ = tbe_cpu.CompiledBackwardTBE
    assert tbe_cpu._load() is not None
    return fbgemm, compiled


def _batch(gen: torch.Generator, kind: str, tables: list[tuple[int, int]]):
    """indices and offsets of one batch: per table, bags of 0-6 ids."""
    lengths = torch.randint(0, 7, (len(tables) * BATCH,), generator=gen)
    lengths[::5] = 0  # empty bags
    ids = []
    for t, (rows, _) in enumerate(tables):
        n = int(lengths[t * BATCH : (t + 1) * BATCH].sum())
        if kind == "heavy tail":
            u = torch.rand(n, generator=gen, dtype=torch.float64)
            ids.append(((1 - u) ** -5.0 - 1).clamp(max=rows - 1).long())
        elif kind == "uniform":
            ids.append(torch.randint(0, rows, (n,), generator=gen))
        else:  # a few rows, each looked up many times
            ids.append(torch.randint(0, min(rows, 3), (n,), generator=gen))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.cat(ids), offsets


def _fbgemm_runs_its_avx2_kernel() -> bool:
    """FBGEMM's row-wise Adagrad is its AVX2 kernel on x86 CPUs with AVX2 (AVX-512
    ones too); elsewhere it runs a reference loop that may sum in another order."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() in ("x86_64", "AMD64") and " avx2" in flags


EXACT = _fbgemm_runs_its_avx2_kernel()


def _assert_same(fbgemm, compiled) -> None:
    if EXACT:  # bit for bit
        assert torch.equal(compiled.weights_host, fbgemm.weights_host)
        assert torch.equal(compiled.momentum1_host, fbgemm.momentum1_host)
    else:
        torch.testing.assert_close(compiled.weights_host, fbgemm.weights_host)
        torch.testing.assert_close(compiled.momentum1_host, fbgemm.momentum1_host)
    assert int(compiled.iter) == int(fbgemm.iter) > 0  # kept by checkpoints
    assert compiled.step == fbgemm.step


def _assert_same_records(records: list[dict], fbgemm_records: list[dict]) -> None:
    """Metrics records equal (to 1e-4 where FBGEMM may round otherwise, see EXACT)."""
    if EXACT:
        assert records == fbgemm_records
        return
    assert [r.keys() for r in records] == [r.keys() for r in fbgemm_records]
    for r, f in zip(records, fbgemm_records, strict=True):
        assert r == {k: pytest.approx(v, rel=1e-4) for k, v in f.items()}


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    """torch's intra-op threads for the test: the compiled update runs that many
    table groups at once (one group: the kernel called inline)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_updates_equal_fbgemms_bit_for_bit(threads: int) -> None:
    fbgemm, compiled = _pair(TABLES)
    gen = torch.Generator().manual_seed(1)
    before = compiled.weights_host.detach().clone()
    for step, kind in enumerate(["heavy tail", "uniform", "repeated"] * 3):
        if step == 6:
            for tbe in (fbgemm, compiled):
                tbe.set_learning_rate(0.3)
        indices, offsets = _batch(gen, kind, TABLES)
        out_f, out_c = fbgemm(indices, offsets), compiled(indices, offsets)
        assert torch.equal(out_c, out_f)
        grad = torch.randn(out_f.shape, generator=gen)
        out_f.backward(grad)
        out_c.backward(grad)
        _assert_same(fbgemm, compiled)
    assert not torch.equal(compiled.weights_host, before), "no row was updated"


def test_a_non_contiguous_gradient_and_int32_ids() -> None:
    tables = [(1000, 16), (200, 8)]
    fbgemm, compiled = _pair(tables)
    gen = torch.Generator().manual_seed(2)
    indices, offsets = _batch(gen, "uniform", tables)
    for tbe in (fbgemm, compiled):
        out = tbe(indices.int(), offsets.int())
        (out * torch.arange(out.shape[1], dtype=torch.float32)).sum().backward()
    _assert_same(fbgemm, compiled)


def test_cases_left_to_fbgemm() -> None:
    assert not tbe_cpu.compiled_case(_tbe([(10, 8)], pooling_mode=PoolingMode.MEAN))
    shared = SplitTableBatchedEmbeddingBagsCodegen(
        [(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        feature_table_map=[0, 0],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
    )
    assert not tbe_cpu.compiled_case(shared)
    assert not tbe_cpu.compiled_case(_tbe([(10, 8)], weight_decay=0.01))
    # Per-id weights: the compiled kernel hands the call to FBGEMM's forward.
    tables = [(300, 8), (50, 16)]
    fbgemm, compiled = _pair(tables)
    gen = torch.Generator().manual_seed(3)
    indices, offsets = _batch(gen, "heavy tail", tables)
    weights = torch.rand(indices.numel(), generator=gen)
    for tbe in (fbgemm, compiled):
        tbe(indices, offsets, per_sample_weights=weights).sum().backward()
    _assert_same(fbgemm, compiled)


def test_table_groups_split_the_lookups_evenly() -> None:
    assert tbe_cpu.table_groups(np.array([0, 10, 20, 30, 40]), 2) == [0, 2, 4]
    assert tbe_cpu.table_groups(np.array([0, 100, 101, 102, 103, 104]), 2) == [0, 1, 5]
    assert tbe_cpu.table_groups(np.array([0, 10, 20, 30, 40]), 8) == [0, 1, 2, 3, 4]
    assert tbe_cpu.table_groups(np.array([0, 10, 20]), 1) == [0, 2]
    assert tbe_cpu.table_groups(np.array([0, 0, 0]), 2) == [0, 2]


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_an_id_past_the_table_is_an_error_naming_it(threads: int) -> None:
    # FBGEMM's forward refuses such an id first; the update checks again before
    # writing, so a bad id can never write outside its table.
    _, compiled = _pair([(10, 8), (5, 8)])
    grad = torch.ones(2, 16)
    with pytest.raises(IndexError, match="table 1 .* outside its 5 rows"):
        compiled.apply_update(grad, torch.tensor([1, 2, 3, 5]), torch.tensor([0, 1, 2, 3, 4]))


def test_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tbe_cpu.SWITCH, "0")
    assert tbe_cpu.use_compiled_backward(torch.nn.Linear(2, 2)) == 0


def test_the_trainer_trains_the_same_with_it_and_uses_it(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Multi-hot synthetic data, one process: the compiled backward really runs, and
    the losses and evals are those of FBGEMM's backward, bit for bit."""
    from trainer.config.schema import to_config
    from trainer.train import train

    calls = []
    update = tbe_cpu.CompiledBackwardTBE.apply_update

    def counted(self, *args: object) -> None:
        calls.append(1)
        update(self, *args)

    monkeypatch.setattr(tbe_cpu.CompiledBackwardTBE, "apply_update", counted)
    records = {}
    for enabled in (False, True):
        monkeypatch.setenv(tbe_cpu.SWITCH, str(int(enabled)))
        calls.clear()
        cfg = compose_cfg(
            ["trainer=smoke", "data.hotness=[3]", "trainer.num_steps=12"]
            + ["trainer.eval_every_steps=6", "trainer.plot=false", "trainer.progress_bar=false"]
        )
        run_dir = tmp_path / str(enabled)
        train(to_config(cfg), run_dir=run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        keep = ("step", "train_loss", "auc", "logloss")
        records[enabled] = [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]
        assert (len(calls) >= 12) == enabled, f"compiled backward calls: {len(calls)}"
    assert sum("auc" in r for r in records[False]) == 2
    _assert_same_records(records[True], records[False])


@pytest.mark.dist
def test_two_ranks_train_the_same_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 gloo ranks, multi-hot bags, tables row-wise, column-wise, table-wise and as
    the planner likes: the metrics and every tensor of the final checkpoint (tables,
    row-wise Adagrad accumulators, dense layers and Adam) are FBGEMM's, bit for bit,
    and the compiled update says it ran."""
    plan = (
        "+sharding.tables={t_cat_0:{strategy:row_wise},t_cat_2:{strategy:column_wise},"
        "t_cat_3:{strategy:table_wise,ranks:[1]}}"
    )
    args = [*TINY, "data.hotness=[3]", plan, "trainer.checkpoint_every_steps=8"]
    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(tbe_cpu.SWITCH, switch)
        run_dir = tmp_path / switch
        fork_trainer(*args, run_dir=run_dir)
        log = (run_dir / "__main__.log").read_text()
        assert ("fused update runs compiled" in log) == (switch == "1")
        runs[switch] = (_records(run_dir), _tensors(run_dir / "checkpoints" / "step_8", tmp_path))
    (fbgemm_records, fbgemm_tensors), (records, tensors) = runs["0"], runs["1"]
    keep = ("step", "train_loss", "auc", "logloss")
    picked = [[{k: r[k] for k in keep if k in r} for r in rs] for rs in (records, fbgemm_records)]
    _assert_same_records(*picked)
    assert sum("auc" in r for r in records) == 2
    assert tensors.keys() == fbgemm_tensors.keys()
    assert any("momentum1" in k or "sum" in k for k in tensors), sorted(tensors)[:20]
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if EXACT:
                assert torch.equal(value, fbgemm_tensors[key]), key
            else:
                torch.testing.assert_close(value, fbgemm_tensors[key], msg=key)
