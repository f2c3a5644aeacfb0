"""MetricsLogger (jsonl, real offline wandb run) and plot_curves."""

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.logger import METRICS_FILE, LoggerConfig, make_logger
from trainer.plots import plot_curves

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "logger"


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


def test_nonzero_rank_writes_nothing(tmp_path: Path) -> None:
    # wandb too: rank 1 must not start a run even when asked for one.
    logger = make_logger(LoggerConfig(name="wandb"), run_dir=tmp_path, rank=1, config={})
    logger.log({"train_loss": 0.5}, step=1)
    logger.summary({"best_auc": 0.5})
    logger.finish()
    assert list(tmp_path.iterdir()) == []


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
    assert cfg.mode == "offline"


def _read_wandb_records(path: Path) -> list:
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
    records = _read_wandb_records(run_file)

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
