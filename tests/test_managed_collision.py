"""Managed collision (model.id_management, trainer/models/collision.py): unsharded and on 2 ranks.

The 2-rank run trains through the trainer's own build path and pipeline on day 1
of a drifting stream (20% of its lookups on new ids), then checkpoints with DCP,
loads into a fresh sharded model (the trainer's load path) and into one
unsharded process. The reference is the unsharded managed-collision model
trained on the same global batches.

Why the two can be compared row for row: sharded, rank r remaps the ids of its
block of the id range into its own rows, so a row's *number* depends on the
world size; what must agree is which ids are admitted and what each admitted
id's row holds. The tables start constant (every row the same value), so which
free row an id is given does not change the numbers, and each rank's rows hold
all of its block's ids (``mc_zch_size=300``, over twice any table's ids), so nothing is
evicted for lack of room in one layout and not in the other.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.bundle import load_program
from compression.serving import fake_quantize_tables
from sharding import destroy_distributed, init_distributed
from sharding.state import _pieces, local_shards
from tests.distributed import run_ranks
from tests.reference import reference_optimizers, reference_step, unsharded_model
from trainer.checkpoint.load import ModelState, load_checkpoint, load_unsharded_model
from trainer.config.schema import Config, ModelConfig, OptimConfig, ShardingConfig, TrainConfig
from trainer.data import SyntheticDataConfig, SyntheticSource, rank_batches
from trainer.errors import ConfigError
from trainer.export.step import export_step
from trainer.loop.train_pipeline import drain
from trainer.models.collision import IdManagedTables
from trainer.session import build

BATCH_SIZE = 16  # per rank
NUM_STEPS = 5
DAY = 1
INIT = 0.05
LOSS_ATOL = 1e-5
ROW_ATOL = 1e-4
EMPTY = torch.iinfo(torch.int64).max
TABLES = [f"t_cat_{i}" for i in range(4)]


def tiny_config(**model: object) -> Config:
    model = {"mc_zch_size": 300, "id_management": "managed_collision", **model}
    return Config(
        model=ModelConfig(
            embedding_dim=8,
            dense_arch_layer_sizes=[16, 8],
            over_arch_layer_sizes=[16, 1],
            **model,
        ),
        data=SyntheticDataConfig(
            num_dense=4,
            cardinalities=[40, 100, 7, 64],
            hotness=[1, 3, 1, 2],
            seed=3,
            num_interactions=3,
            days=2,
            new_id_share=0.2,
        ),
        sharding=ShardingConfig(strategy="row_wise", device="cpu"),
        optim=OptimConfig(embedding_lr=0.1, dense_lr=0.01),
        trainer=TrainConfig(batch_size=BATCH_SIZE, num_steps=NUM_STEPS),
    )


def _tables(model: torch.nn.Module) -> IdManagedTables:
    return model.model.sparse_arch.embedding_bag_collection


def _constant_tables(tables: IdManagedTables) -> None:
    """Every row (and every row handed to a new id later) starts at INIT."""
    ebc = tables.mc._embedding_module
    for config in (
        ebc._table_name_to_config.values()
        if hasattr(ebc, "_table_name_to_config")
        else ebc.embedding_bag_configs()
    ):
        config.init_fn = partial(torch.nn.init.constant_, val=INIT)


def _remap_state(tables: IdManagedTables) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per table: the admitted raw ids and the (global) rows they map to."""
    out = {}
    for name, m in tables.remap_modules().items():
        used = m._mch_sorted_raw_ids != EMPTY
        out[name] = (m._mch_sorted_raw_ids[used].clone(), m._mch_remapped_ids_mapping[used].clone())
    return out


def _copy_init(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> None:
    """The reference's weights (not its remap state) into the sharded model's shards."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in init:
                for offsets, local in _pieces(value):
                    index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
                    local.copy_(init[key][index])


def _worker(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    env = init_distributed(device="cpu")
    try:
        cfg = tiny_config()
        built = build(cfg, env)
        _copy_init(built.model, torch.load(out / "init.pt"))
        _constant_tables(_tables(built.model.module))
        pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
        source = SyntheticSource(cfg.data, day=DAY)
        batches = rank_batches(
            source, "train", batch_size=BATCH_SIZE, rank=rank, world_size=2, num_batches=NUM_STEPS
        )
        losses = []
        for loss, _logits, _labels in drain(pipeline, batches):
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / env.world_size)
        built.model.eval()
        probe = source.batch("eval", rank * BATCH_SIZE, BATCH_SIZE)
        # The pipeline owns the sharded module's forward now: score through it.
        ((_, logits, _),) = list(drain(pipeline, iter([probe])))
        states = {"model": ModelState(built.model), "trainer": {"step": torch.tensor(NUM_STEPS)}}
        dcp.save(states, checkpoint_id=out / "ckpt")
        # The export (collective): each rank's map and rows meet on rank 0's bundle,
        # scored on the eval set the probes make up.
        data = dataclasses.replace(cfg.data, num_eval_samples=2 * BATCH_SIZE)
        export_step(
            built.model,
            model_config=cfg.model,
            converters=built.converters,
            tables=built.tables,
            source=SyntheticSource(data, day=DAY),
            eval_batch_size=2 * BATCH_SIZE,
            run_dir=out / "export",
        )
        # The trainer's load path into a fresh sharded model (the same plan).
        fresh = build(cfg, env)
        load_checkpoint(out / "ckpt", states={"model": ModelState(fresh.model)})
        fresh.model.eval()
        with torch.no_grad():
            _, (_, fresh_logits, _) = fresh.model(probe)
        torch.save(
            {
                **_hash_checkpoint(env, probe, out / "hash_ckpt"),
                "losses": losses,
                "remap": _remap_state(_tables(built.model.module)),
                "fresh_remap": _remap_state(_tables(fresh.model.module)),
                "shards": local_shards(built.model),
                "logits": logits.detach().clone(),
                "fresh_logits": fresh_logits.detach().clone(),
            },
            out / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


def _hash_checkpoint(env, probe, path: Path) -> dict[str, torch.Tensor]:
    """A 2-rank hashed model scored on ``probe``, saved, loaded into a fresh 2-rank model
    (the trainer's load path) and scored again."""
    built, fresh = (build(tiny_config(id_management="hash"), env) for _ in range(2))
    # Every row its own values (each rank's seeded init repeats the other's rows).
    rows = torch.Generator().manual_seed(1)
    tables = {k: v for k, v in built.model.state_dict().items() if ".embedding_bags." in k}
    _copy_init(built.model, {k: torch.randn(v.size(), generator=rows) for k, v in tables.items()})
    states = {"model": ModelState(built.model), "trainer": {"step": torch.tensor(0)}}
    dcp.save(states, checkpoint_id=path)
    load_checkpoint(path, states={"model": ModelState(fresh.model)})
    out = {}
    for name, model in (("hash_logits", built.model), ("hash_fresh_logits", fresh.model)):
        model.eval()
        with torch.no_grad():
            out[name] = model(probe)[1][1].detach().clone()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mc2")
    torch.manual_seed(0)
    model = unsharded_model(tiny_config(), device=torch.device("cpu"))
    with torch.no_grad():
        for bag in _tables(model).mc._embedding_module.embedding_bags.values():
            bag.weight.fill_(INIT)
    init = {k: v for k, v in model.state_dict().items() if "_managed_collision" not in k}
    torch.save(init, out / "init.pt")
    run_ranks(_worker, str(out))
    return out


def _reference(init: dict[str, torch.Tensor]) -> tuple[list[float], torch.nn.Module]:
    cfg = tiny_config()
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init, strict=False)
    tables = _tables(model)
    _constant_tables(tables)
    params = [b.weight for b in tables.mc._embedding_module.embedding_bags.values()]
    optimizers = reference_optimizers(model, params, cfg.optim)
    source = SyntheticSource(cfg.data, day=DAY)
    global_batch = 2 * BATCH_SIZE
    losses = [
        reference_step(model, source.batch("train", step * global_batch, global_batch), optimizers)
        for step in range(NUM_STEPS)
    ]
    return losses, model


def test_two_ranks_match_unsharded_reference(two_ranks: Path) -> None:
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    ref_losses, ref = _reference(torch.load(two_ranks / "init.pt"))
    assert max(ref_losses) - min(ref_losses) > 1e-3  # training moved
    torch.testing.assert_close(ranks[0]["losses"], ref_losses, atol=LOSS_ATOL, rtol=0)

    ref_remap = _remap_state(_tables(ref))
    bags = _tables(ref).mc._embedding_module.embedding_bags
    for table, (ref_ids, ref_rows) in ref_remap.items():
        assert ref_ids.numel() > 0
        sharded_ids = torch.cat([r["remap"][table][0] for r in ranks])
        # The same ids admitted, each rank's from its own block and into its own rows.
        assert sorted(sharded_ids.tolist()) == sorted(ref_ids.tolist())
        key = next(k for k in ranks[0]["shards"] if k.endswith(f".{table}.weight"))
        for r in ranks:
            ids, rows = r["remap"][table]
            (offset, _), weight = r["shards"][key][0]
            assert bool(((rows >= offset) & (rows < offset + weight.shape[0])).all())
            # Each admitted id's row holds what the reference's row for that id holds.
            ref_row = ref_rows[torch.searchsorted(ref_ids, ids)]
            torch.testing.assert_close(
                weight[rows - offset], bags[table].weight[ref_row].detach(), atol=ROW_ATOL, rtol=0
            )
        # Both ranks' blocks got ids: the id range really is split.
        assert all(r["remap"][table][0].numel() > 0 for r in ranks) or table == "t_cat_2"


def test_checkpoint_keeps_remap_state(two_ranks: Path) -> None:
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for table, (ids, rows) in r["remap"].items():
            fresh_ids, fresh_rows = r["fresh_remap"][table]
            assert torch.equal(ids, fresh_ids) and torch.equal(rows, fresh_rows)
        torch.testing.assert_close(r["fresh_logits"], r["logits"], atol=1e-6, rtol=0)
    # Onto one unsharded process: the union of the ranks' maps, same rows, same scores.
    model = unsharded_model(tiny_config(), device=torch.device("cpu"))
    load_unsharded_model(two_ranks / "ckpt", model)
    for table, (ids, rows) in _remap_state(_tables(model)).items():
        both = [r["remap"][table] for r in ranks]
        merged = dict(
            zip(torch.cat([b[0] for b in both]).tolist(), torch.cat([b[1] for b in both]).tolist())
        )
        assert dict(zip(ids.tolist(), rows.tolist())) == merged
    model.eval()
    source = SyntheticSource(tiny_config().data, day=DAY)
    with torch.no_grad():
        _, (_, logits, _) = model(source.batch("eval", 0, 2 * BATCH_SIZE))
    expected = torch.cat([r["logits"] for r in ranks])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_one_process_resume_of_rank_blocks_is_refused(two_ranks: Path) -> None:
    """A 2-rank hashed / MC checkpoint remaps ids in 2 rank blocks; one process would
    remap them with the whole-table rule (``id % rows``, the table's last row for a
    miss): the trainer's load path refuses it, naming the fix. On 2 ranks it resumes."""
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    expected = torch.cat([r["hash_logits"] for r in ranks])
    for r in ranks:  # the same layout resumes and scores as before
        torch.testing.assert_close(r["hash_fresh_logits"], r["hash_logits"], atol=1e-6, rtol=0)
    # The bug the refusal prevents: the whole-table rule reads other rows.
    model = unsharded_model(tiny_config(id_management="hash"), device=torch.device("cpu"))
    load_unsharded_model(two_ranks / "hash_ckpt", model)
    model.eval()
    with torch.no_grad():
        _, (_, logits, _) = model(
            SyntheticSource(tiny_config().data, day=DAY).batch("eval", 0, 2 * BATCH_SIZE)
        )
    assert float((logits - expected).abs().max()) > 1e-3
    for cfg, ckpt in ((tiny_config(id_management="hash"), "hash_ckpt"), (tiny_config(), "ckpt")):
        model = unsharded_model(cfg, device=torch.device("cpu"))
        with pytest.raises(ConfigError, match=r"2 id blocks.*torchrun --nproc_per_node=2"):
            load_checkpoint(two_ranks / ckpt, states={"model": ModelState(model)})


def test_two_rank_export_serves_the_sharded_scores(two_ranks: Path) -> None:
    """The bundle of the 2-rank model (its ranks' maps merged, each block's rows) scores
    the eval probes as the sharded model did, from the raw ids."""
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    bundle = two_ranks / "export" / "bundle"
    sample = torch.load(bundle / "sample.pt", weights_only=True)
    with torch.no_grad():
        got = load_program(bundle / "model.pt2")(sample["dense"], sample["ids"], sample["lengths"])
    sharded = torch.sigmoid(torch.cat([r["logits"] for r in ranks]).flatten())
    # The served tables are int8 (trainer.export_bits), the sharded model's fp32 ...
    assert float((got - sharded).abs().max()) <= 1e-3
    # ... and the checkpoint's model with its tables int8-rounded scores as the bundle does.
    model = unsharded_model(tiny_config(), device=torch.device("cpu"))
    load_unsharded_model(two_ranks / "ckpt", model)
    dlrm = model.model.eval()
    fake_quantize_tables(dlrm, table_bits=dict.fromkeys(TABLES, 8))
    kjt = KeyedJaggedTensor(
        keys=[f"cat_{i}" for i in range(4)], values=sample["ids"], lengths=sample["lengths"]
    )
    with torch.no_grad():
        expected = torch.sigmoid(dlrm(sample["dense"], kjt).flatten())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample["scores"], got, atol=1e-5, rtol=0)
    schema = json.loads((bundle / "schema.json").read_text())
    remap = schema["features"][1]["id_management"]
    assert remap["blocks"]["count"] == 2 and remap["blocks"]["row_starts"] == [0, 150, 300]
    merged = sum(r["remap"]["t_cat_1"][0].numel() for r in ranks)
    assert remap["map_size"] == merged


def test_unsharded_admits_evicts_and_misses() -> None:
    """Unsharded, 16 rows for a 104-id table: LRU keeps the latest ids, unseen ids miss."""
    cfg = tiny_config(mc_zch_size=16)
    torch.manual_seed(0)
    model = unsharded_model(cfg, device=torch.device("cpu"))
    tables = _tables(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    source = SyntheticSource(cfg.data, day=DAY)
    losses = []
    for step in range(4):
        batch = source.batch("train", step * 64, 64)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    m = tables.remap_modules()["t_cat_1"]
    ids = m._mch_sorted_raw_ids[m._mch_sorted_raw_ids != EMPTY]
    assert ids.numel() == 15  # full (more distinct ids came); the 16th row is the miss row
    last = batch.sparse_features["cat_1"].values().unique()
    # LRU: the last batch's ids (up to the rows there are) are the ones kept.
    assert bool(torch.isin(last, ids).sum() >= min(16, last.numel()) - 1)
    # Eval never admits: an id outside the map reads the miss row (the last).
    model.eval()
    unseen = torch.tensor([i for i in range(m.input_size()) if i not in set(ids.tolist())][:3])
    remapped = m.remap({"t_cat_1": _jt(unseen)})["t_cat_1"].values()
    assert remapped.tolist() == [15, 15, 15]


def test_hash_remaps_modulo_rows() -> None:
    cfg = tiny_config(mc_zch_size=16)
    cfg.model.id_management = "hash"
    model = unsharded_model(cfg, device=torch.device("cpu"))
    m = _tables(model).remap_modules()["t_cat_1"]
    out = m.remap({"t_cat_1": _jt(torch.tensor([3, 19, 35, 50]))})["t_cat_1"].values()
    assert out.tolist() == [3, 3, 3, 2]
    loss, _ = model(SyntheticSource(cfg.data, day=DAY).batch("train", 0, 32))
    assert torch.isfinite(loss)


def test_remap_from_another_layout_is_refused() -> None:
    """A remap whose rows fall outside this model's rows (saved on another world size)."""
    model = unsharded_model(tiny_config(mc_zch_size=16), device=torch.device("cpu"))
    state = model.state_dict()
    key = next(k for k in state if k.endswith("t_cat_1._mch_remapped_ids_mapping"))
    state[key] = state[key] + 16  # rows [16, 32): another rank's
    with pytest.raises(ConfigError, match="resume on the world size that saved it"):
        model.load_state_dict(state)


def _jt(values: torch.Tensor):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    return JaggedTensor(values=values, lengths=torch.ones_like(values))


def test_validation_names_the_setting() -> None:
    from trainer.config.validate import validate

    validate(tiny_config(), world_size=1)  # row_wise on one rank is fine with MC
    cfg = tiny_config()
    cfg.trainer.export = True
    validate(cfg, world_size=1)  # the bundle remaps the raw ids (tests/test_bundle_remap.py)
    cfg = tiny_config()
    cfg.sharding.strategy = "table_wise"
    with pytest.raises(ConfigError, match="sharding=row_wise"):
        validate(cfg, world_size=2)
