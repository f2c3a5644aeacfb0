"""MetricsLogger (jsonl, real offline wandb runs read back from their files) and plot_curves."""

import json
import os
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.distributed import fork_trainer
from trainer.report.logger import (
    METRICS_FILE,
    LoggerConfig,
    hydra_run_labels,
    make_logger,
    plan_rows,
    wandb_mode,
)
from trainer.report.plots import plot_curves

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "logger"


@pytest.fixture(autouse=True)
def wandb_home(tmp_path: Path, monkeypatch) -> None:
    """wandb's own cache/config/data dirs in the test's tmp dir, never online."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / ".wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_jsonl_records_round_trip(tmp_path: Path) -> None:
    logger = make_logger(LoggerConfig(), run_dir=tmp_path, rank=0, config={})
    logger.log({"train_loss": 0.5}, step=10)
    logger.log({"auc": 0.75, "ne": 0.9}, step=20)
    logger.summary({"best_auc": 0.75})  # no wandb: accepted, nothing to write
    logger.finish()
    logger.finish()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "train_loss": 0.5},
        {"step": 20, "auc": 0.75, "ne": 0.9},
    ]
    assert not (tmp_path / "wandb").exists()  # logger=none: no wandb files at all


def test_nonzero_rank_writes_nothing(tmp_path: Path) -> None:
    # wandb too: rank 1 must not start a run even when asked for one.
    logger = make_logger(LoggerConfig(name="wandb"), run_dir=tmp_path, rank=1, config={})
    logger.log({"train_loss": 0.5}, step=1)
    logger.summary({"best_auc": 0.5})
    logger.finish()
    assert list(tmp_path.iterdir()) == []  # no metrics.jsonl, no wandb dir, no wandb home


def test_bad_config_fails_with_the_key_and_the_fix(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="logger.name='tensorboard'"):
        make_logger(LoggerConfig(name="tensorboard"), run_dir=tmp_path, rank=0, config={})
    # Online without any credentials must fail fast, never prompt or hang.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        make_logger(LoggerConfig(name="wandb", mode="online"), run_dir=tmp_path, rank=0, config={})
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("name", ["none", "wandb"])
def test_yaml_matches_schema(name: str) -> None:
    schema = OmegaConf.structured(LoggerConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    assert cfg.name == name
    assert cfg.mode == "auto"


def test_auto_mode_is_offline_without_a_key(monkeypatch) -> None:
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"  # an explicit mode wins over the key


def read_wandb_records(path: Path) -> list:
    """Decodes a .wandb file: a 7-byte header, then leveldb-log style records
    (crc u32, length u16, type u8; FULL=1 FIRST=2 MIDDLE=3 LAST=4) in 32 KiB
    blocks, each payload a wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block_bytes, header_bytes = 32768, 7
    pos, payload, records = header_bytes, b"", []
    while pos + header_bytes <= len(data):
        left_in_block = block_bytes - pos % block_bytes
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header_bytes])
        if left_in_block < header_bytes or (kind == 0 and length == 0):
            pos += left_in_block  # block trailer padding
            continue
        payload += data[pos + header_bytes : pos + header_bytes + length]
        pos += header_bytes + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def test_wandb_offline_run_lands_in_run_dir(tmp_path: Path) -> None:
    cfg = LoggerConfig(name="wandb", tags=["test"])
    logger = make_logger(cfg, run_dir=tmp_path, rank=0, config={"lr": 0.01})
    try:
        logger.log({"train_loss": 0.7}, step=0)
        logger.log({"train_loss": 0.6}, step=5)
        logger.log({"auc": 0.71}, step=5)
        logger.summary({"best_auc": 0.71})
    finally:
        logger.finish()
    logger.finish()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)

    (run,) = [r.run for r in records if r.HasField("run")]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 0.01
    assert list(run.tags) == ["test"]

    history = [
        {item.key or item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert [(h["_step"], h.get("train_loss"), h.get("auc")) for h in history] == [
        (0, 0.7, None),
        (5, 0.6, 0.71),  # same step: wandb merges the eval into the train row
    ]
    summary = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.HasField("summary")
        for item in r.summary.update
        if item.key
    }
    assert summary["best_auc"] == 0.71
    # The jsonl sink runs beside wandb, one line per call.
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 3


def read_wandb_run(run_dir: Path) -> dict:
    """The one offline wandb run under ``run_dir``: its run record, history, summary, files."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    (run,) = [r.run for r in records if r.HasField("run")]
    history = []
    for r in (r for r in records if r.HasField("history")):
        row: dict = {}
        for item in r.history.item:  # a media value comes as one item per field
            *parents, leaf = [item.key] if item.key else list(item.nested_key)
            node = row
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = json.loads(item.value_json)
        history.append(row)
    return {
        "run": run,
        "config": {item.key: json.loads(item.value_json) for item in run.config.update},
        "history": history,
        "files": run_file.parent / "files",
    }


def _saved_plan() -> dict:
    shard = {"rank": 0, "offsets": [0, 0], "sizes": [10, 4]}
    return {
        "strategy": "auto",
        "world_size": 2,
        "plan": {
            "model.sparse_arch.ebc": {
                "t_a": {
                    "sharding_type": "table_wise",
                    "compute_kernel": "fused",
                    "ranks": [0],
                    "shards": [shard],
                },
                "t_b": {
                    "sharding_type": "row_wise",
                    "compute_kernel": "fused",
                    "ranks": [0, 1],
                    "shards": [shard, {**shard, "rank": 1, "offsets": [10, 0]}],
                },
            }
        },
    }


def test_wandb_run_carries_group_name_plan_and_plots(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(_saved_plan()))
    plot_curves([{"step": 0, "train_loss": 0.7}, {"step": 5, "auc": 0.6}], tmp_path / "curves.png")
    logger = make_logger(
        LoggerConfig(name="wandb"),
        run_dir=tmp_path,
        rank=0,
        config={"optim": {"embedding_lr": 0.02}},
        group="multirun/lr_batch/2026-11-29_18-00-00",
        name="optim.embedding_lr=0.02",
    )
    logger.log({"auc": 0.6}, step=5)
    logger.finish()

    got = read_wandb_run(tmp_path)
    assert got["run"].run_group == "multirun/lr_batch/2026-11-29_18-00-00"
    assert got["run"].display_name == "optim.embedding_lr=0.02"
    assert got["config"]["optim"] == {"embedding_lr": 0.02}
    (last,) = [h for h in got["history"] if "sharding_plan" in h]
    assert last["sharding_plan"]["_type"] == "table-file" and last["_step"] == 5
    assert last["plots/curves"]["_type"] == "image-file"
    (table_file,) = (got["files"] / "media" / "table").glob("sharding_plan_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == plan_rows(_saved_plan())[0]
    assert [row[1:5] for row in table["data"]] == [
        ["t_a", "table_wise", "fused", "0"],
        ["t_b", "row_wise", "fused", "0,1"],
    ]
    assert table["data"][1][5] == "r0:10x4@0,0 r1:10x4@10,0"
    (image,) = (got["files"] / "media" / "images" / "plots").glob("curves_*.png")
    assert image.read_bytes() == (tmp_path / "curves.png").read_bytes()


def test_no_hydra_no_labels() -> None:
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None  # an in-process `python -m trainer` test may have set it
    assert hydra_run_labels() == (None, None)


@pytest.mark.dist
def test_two_ranks_one_wandb_run(tmp_path: Path) -> None:
    """A real 2-rank run with logger=wandb: rank 0's run only, with config, plan, plots."""
    env_keys = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    assert all(k in os.environ for k in env_keys)  # the subprocess inherits the tmp homes
    run_dir = tmp_path / "run"
    fork_trainer(
        "sharding=row_wise",
        "logger=wandb",
        "trainer=smoke",
        "trainer.num_steps=4",
        "trainer.eval_every_steps=2",
        "data.num_eval_samples=2048",
        "trainer.eval_batch_size=512",
        run_dir=run_dir,
    )
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    got = read_wandb_run(run_dir)
    assert got["config"]["sharding"]["strategy"] == "row_wise"
    assert got["run"].run_group == ""  # a single run is in no sweep
    assert got["run"].display_name  # its overrides, e.g. "logger=wandb,sharding=row_wise,..."
    assert "sharding=row_wise" in got["run"].display_name
    evals = [h for h in got["history"] if "auc" in h]
    assert [h["_step"] for h in evals] == [2, 4]
    (plan,) = [h for h in got["history"] if "sharding_plan" in h]
    assert plan["plots/curves"]["_type"] == "image-file"
    (table_file,) = (got["files"] / "media" / "table").glob("sharding_plan_*.table.json")
    ranks = {row[4] for row in json.loads(table_file.read_text())["data"]}
    assert ranks == {"0,1"}  # row_wise: every table on both ranks


def test_plot_writes_a_png(tmp_path: Path) -> None:
    records = [{"step": s, "train_loss": 0.7 - 0.001 * s} for s in range(0, 200, 10)]
    records += [{"step": s, "auc": 0.6 + 0.0005 * s, "ne": 0.9} for s in (0, 100, 190)]
    records.append({"step": 190, "note": "neither kind"})
    out = plot_curves(records, tmp_path / "plots" / "curves.png", oracle_auc=0.8)
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # two labelled panels, not a blank canvas

    # Only one kind of record (an eval-free run) still gives a figure.
    train_only = plot_curves(records[:5], tmp_path / "train_only.png")
    assert train_only.stat().st_size > 5_000
