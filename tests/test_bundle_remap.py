"""The serving bundle of a hashed or managed-collision model remaps the raw ids itself.

(a) The program's remap (compression/bundle_remap.py) against torchrec's own
modules in eval: ``MCHManagedCollisionModule`` after admitting ids, on one block
and on two (each block's module rebuilt for its rows, as torchrec's row-wise
sharding does), and hashing (``ModuloCollisionModule``).

(b) An unsharded model trained 4 steps on day 1 of a drifting stream (20% of
its lookups on new ids; 16 rows for up to 141 ids, so many eval ids miss the
map), exported (``export_step``): the bundle's program scores ``sample.pt`` as
the trained model's eval forward does (torchrec's remap; with ``qat=int8`` the
tables fake-quantized), in this process and (``qat=int8``) in a fresh
interpreter that cannot import shardrec or torchrec. The 2-rank export is
tests/test_managed_collision.py's.

(c) The trainer's path (slow tier): a one-process ``trainer.export=true`` run
and ``python -m trainer.export`` of its checkpoint give bundles that score the
sample as the checkpoint loaded into the unsharded model does.

Served tables are int8 (``qat=int8``, or ``trainer.export_bits=8`` after
training in fp32): the reference's tables hold ``fake_quantize_rows`` of theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrec.modules.mc_modules import LRU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from compression.bundle import load_program
from compression.bundle_remap import IdRemap, TableRemap
from compression.serving import fake_quantize_tables
from tests.reference import unsharded_model
from tests.test_bundle import load_in_fresh_interpreter
from tests.test_managed_collision import tiny_config
from trainer.builder.compression import build_converters
from trainer.config.tables import run_tables
from trainer.data import SyntheticSource
from trainer.export.step import export_step
from trainer.models.collision import PLANNER_BUCKETS, ModuloCollisionModule

DAY = 1
ATOL = 1e-5
EMPTY = torch.iinfo(torch.int64).max


def _jt(values: list[int]) -> dict[str, JaggedTensor]:
    v = torch.tensor(values, dtype=torch.int64)
    return {"t": JaggedTensor(values=v, lengths=torch.ones_like(v))}


def _block_modules(kind: str, *, rows: int, input_size: int, blocks: int) -> list:
    """One module per block of rows, as torchrec's row-wise sharding rebuilds them."""
    starts = [b * rows // blocks for b in range(blocks)] + [rows]
    if kind == "hash":
        whole = ModuloCollisionModule(
            rows, torch.device("cpu"), input_size, buckets=PLANNER_BUCKETS
        )
    else:
        whole = MCHManagedCollisionModule(
            zch_size=rows,
            device=torch.device("cpu"),
            eviction_policy=LRU_EvictionPolicy(),
            eviction_interval=1,
            input_hash_size=input_size,
            name="t",
            buckets=PLANNER_BUCKETS,
        )
    if blocks == 1:
        return [whole]
    return [
        whole.rebuild_with_output_id_range((starts[b], starts[b + 1]), starts)
        for b in range(blocks)
    ]


@pytest.mark.parametrize("kind", ["managed_collision", "hash"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_remap_is_torchrecs(kind: str, blocks: int) -> None:
    rows, input_size = 12, 100
    modules = _block_modules(kind, rows=rows, input_size=input_size, blocks=blocks)
    block = -(-input_size // blocks)
    generator = torch.Generator().manual_seed(0)
    admitted = torch.randint(0, input_size, (40,), generator=generator).tolist()
    for b, m in enumerate(modules):  # each block admits its own ids (training)
        m.train()
        m(_jt([i for i in admitted if i // block == b]))
        m.eval()
    queries = list(range(input_size)) + ([100, 250, 7_000] if blocks == 1 else [])
    expected = torch.cat(
        [modules[min(i // block, blocks - 1)].remap(_jt([i]))["t"].values() for i in queries]
    )
    mapped = {}
    if kind == "managed_collision":
        mapped = {
            "ids": torch.cat([m._mch_sorted_raw_ids for m in modules]),
            "rows": torch.cat([m._mch_remapped_ids_mapping for m in modules]),
        }
    starts = [b * rows // blocks for b in range(blocks)] + [rows]
    remap = IdRemap(
        {"t": TableRemap(kind, starts, input_size, **mapped)},
        feature_tables={"f": "t", "g": "u"},
        feature_names=["g", "f"],
    )
    ids = torch.tensor([5, 6, *queries])  # feature g (direct) reads ids 5, 6 unchanged
    lengths = torch.tensor([2, len(queries)])
    got = remap(ids, lengths)
    assert got[:2].tolist() == [5, 6]
    assert torch.equal(got[2:], expected)
    if kind == "managed_collision":
        misses = expected == torch.tensor(
            [starts[min(i // block, blocks - 1) + 1] - 1 for i in queries]
        )
        assert 0 < int(misses.sum()) < len(queries)  # both hits and misses were checked


def _trained(kind: str, qat_bits: int):
    """An unsharded model trained 4 steps on day 1, and the export's inputs."""
    cfg = tiny_config(mc_zch_size=16)
    cfg.model.id_management = kind
    cfg.qat.bits = qat_bits
    cfg.data.num_eval_samples = 512
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu"))
    source = SyntheticSource(cfg.data, day=DAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        loss, _ = model(source.batch("train", step * 64, 64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cfg, model, source


def _eval_scores(dlrm: torch.nn.Module, sample: dict) -> torch.Tensor:
    """The trained model's eval forward (torchrec's remap) on the bundle's sample."""
    names = [f"cat_{i}" for i in range(4)]
    kjt = KeyedJaggedTensor(keys=names, values=sample["ids"], lengths=sample["lengths"])
    with torch.no_grad():
        return torch.sigmoid(dlrm(sample["dense"], kjt).flatten())


@pytest.mark.parametrize(
    ("kind", "qat_bits"),
    [
        ("managed_collision", 8),
        ("hash", 0),
        pytest.param("managed_collision", 0, marks=pytest.mark.slow),
    ],
    ids=["mc-qat-int8", "hash-ptq-int8", "mc-ptq-int8"],
)
def test_bundle_remaps_raw_ids(tmp_path: Path, kind: str, qat_bits: int) -> None:
    cfg, model, source = _trained(kind, qat_bits)
    tables = run_tables(cfg, features=source.features)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    export = export_step(
        model,
        model_config=cfg.model,
        converters=converters,
        tables=tables,
        source=source,
        eval_batch_size=128,
        run_dir=tmp_path,
    )
    bundle = tmp_path / export["path"]
    sample = torch.load(bundle / "sample.pt", weights_only=True)
    dlrm = model.model.eval()
    # The tables hold the rows serving reads (int8: QAT's bits, else trainer.export_bits).
    assert export["bits"] == dict.fromkeys(export["bits"], 8) and len(export["bits"]) == 4
    fake_quantize_tables(dlrm, table_bits=export["bits"], row_range=export["row_range"])
    expected = _eval_scores(dlrm, sample)
    program = load_program(bundle / "model.pt2")
    with torch.no_grad():
        got = program(sample["dense"], sample["ids"], sample["lengths"])
    diff = float((got - expected).abs().max())
    print(f"{kind} qat={qat_bits}: bundle vs trained eval max |diff| {diff:.3g}")
    assert diff <= ATOL
    assert float((sample["scores"] - expected).abs().max()) <= ATOL

    schema = json.loads((bundle / "schema.json").read_text())
    remap = schema["features"][1]["id_management"]
    assert remap["kind"] == kind and remap["rows"] == 16 and remap["input_size"] == 141
    assert "raw ids" in schema["inputs"]["ids"]
    if kind == "managed_collision":
        m = dlrm.sparse_arch.embedding_bag_collection.remap_modules()["t_cat_1"]
        mapped = m._mch_sorted_raw_ids[m._mch_sorted_raw_ids != EMPTY]
        assert remap["map_size"] == mapped.numel() == 15 and remap["miss_row"] == 15
        lengths = sample["lengths"].view(4, -1)  # (feature, sample)
        ids = sample["ids"][int(lengths[0].sum()) :][: int(lengths[1].sum())]
        missing = ~torch.isin(ids, mapped)
        assert 0 < int(missing.sum()) < ids.numel()  # the sample hits and misses the map
    if not qat_bits:  # the fresh interpreter (~20 s on 2 busy cores) once
        return
    inputs = [(sample["dense"], sample["ids"], sample["lengths"])]
    server = load_in_fresh_interpreter(bundle, inputs, tmp_path / "server")
    assert server["loaded"] == 0
    assert float((server["sample"] - expected).abs().max()) <= ATOL


@pytest.mark.slow  # ~60 s on 2 busy cores; the 2-rank export is in test_managed_collision.py
def test_trainer_and_offline_export_remap(tmp_path: Path, compose_cfg) -> None:
    from tests.test_bundle import _run
    from trainer.builder.model import build_unsharded
    from trainer.checkpoint.load import load_unsharded_model
    from trainer.config.schema import to_config
    from trainer.export.offline import export_checkpoint

    overrides = [
        "model.id_management=managed_collision",
        "model.mc_zch_size=64",
        "sharding=row_wise",
        "trainer.checkpoint_every_steps=8",
    ]
    summary = _run(tmp_path / "run", compose_cfg, *overrides)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_8"
    offline = export_checkpoint(checkpoint, out=tmp_path / "offline")
    assert offline["auc"] == summary["export"]["auc"]

    cfg = to_config(compose_cfg(["trainer=smoke", *overrides]))
    source = SyntheticSource(cfg.data)
    tables = run_tables(cfg, features=source.features)
    model = build_unsharded(
        cfg.model, tables=tables, num_dense=source.num_dense, device=torch.device("cpu")
    )
    load_unsharded_model(checkpoint, model)
    dlrm = model.model.eval()
    fake_quantize_tables(dlrm, table_bits=offline["bits"], row_range=offline["row_range"])
    for bundle in (tmp_path / "run" / "bundle", tmp_path / "offline"):
        sample = torch.load(bundle / "sample.pt", weights_only=True)
        names = [f.name for f in source.features]
        kjt = KeyedJaggedTensor(keys=names, values=sample["ids"], lengths=sample["lengths"])
        with torch.no_grad():
            expected = torch.sigmoid(dlrm(sample["dense"], kjt).flatten())
            got = load_program(bundle / "model.pt2")(
                sample["dense"], sample["ids"], sample["lengths"]
            )
        assert float((got - expected).abs().max()) <= ATOL, bundle
        schema = json.loads((bundle / "schema.json").read_text())
        remap = schema["features"][0]["id_management"]
        assert remap["kind"] == "managed_collision" and remap["rows"] == 64
        assert 0 < remap["map_size"] <= 63
