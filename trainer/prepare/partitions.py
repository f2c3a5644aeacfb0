"""``prepare`` with ``data.partition=NAME``: one partition appended to a partitioned dataset.

The dataset (layout in :mod:`trainer.data.partitions`) grows one partition per
call: ``data.dir`` is the dataset, ``data.partition`` the new partition's name,
``data.raw`` its files (a Criteo ``day_N``, a day's table). Under a lock on the
dataset, the partition is prepared like a whole dataset into a scratch
directory beside the others, renamed to ``partitions/<name>/`` when complete,
and only then listed in ``manifest.json`` (replaced atomically). A killed
prepare leaves a scratch directory (removed by the next prepare) or an unlisted
partition (replaced by the next prepare of that name); neither is ever listed.

Every partition shares the dataset's settings (mapping, ``min_count``,
``table_rows``, columns ...; only the inputs differ); another setting is refused,
naming the key. With ``mapping=vocab`` the new partition's vocabulary extends the
last partition's: old ids keep their rows, ids new in this partition that
reached ``min_count`` get the next rows until ``table_rows`` is full (later new
ids share the out-of-vocabulary row 1); every partition's tables have
``table_rows`` rows, so a model trained on day 0 reads day 5's ids unchanged.
Preparing a listed partition again with the same inputs is a no-op; with other
inputs it is refused (a model may have trained on it).

Example::

    cfg = CriteoDataConfig(raw=["day_1"], dir="data/days", partition="day_1", mapping="vocab")
    result = prepare(cfg)            # trainer.prepare.prepare dispatches here
    result.directory                 # data/days/partitions/day_1
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.data_configs import PreparedDataConfig
from trainer.data.partitions import (
    PARTITIONS_DIR,
    Manifest,
    PartitionEntry,
    is_partitioned,
)
from trainer.data.shard_format import METADATA_FILE, ShardMetadata
from trainer.prepare import (
    PrepareError,
    PrepareResult,
    _finish,
    _inputs,
    _run_pipeline,
    fingerprint_settings,
    record_settings,
    settings_fingerprint,
)
from trainer.prepare.common import BadRowLog, merge_bad_rows
from trainer.prepare.output import vocab_path

LOCK_FILE = ".prepare.lock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
# What may differ between a dataset's partitions: the inputs, the name, and whether
# a bad row stops the prepare (a partition's skipped rows are in its metadata.json).
_PER_PARTITION = {"raw", "eval_raw", "partition", "joins", "on_bad_row"}


def prepare_partition(cfg: PreparedDataConfig, *, progress: bool = True) -> PrepareResult:
    """Prepares ``cfg.raw`` as partition ``cfg.partition`` of the dataset ``cfg.dir``."""
    name = cfg.partition
    if not _NAME.fullmatch(name):
        raise PrepareError(
            f"data.partition={name!r}: a partition name is letters, digits and _.=+- "
            "(not starting with one of those signs), e.g. data.partition=day_1"
        )
    inputs = _inputs(cfg)
    fingerprint = settings_fingerprint(cfg, inputs)
    with open_dataset(cfg) as (dataset, manifest):
        listed = manifest.entry(name)
        if listed is not None:
            if listed.fingerprint != fingerprint:
                raise PrepareError(
                    f"data.partition={name} is already in {dataset} (prepared from other "
                    "inputs); partitions are append-only, as a model may have trained on it: "
                    "pick a new data.partition"
                )
            target = dataset / listed.path
            meta = ShardMetadata.read(target)
            record_settings(target, meta, cfg)
            return PrepareResult(target, meta, up_to_date=True)
        return append_partition(
            cfg, dataset, manifest, inputs=inputs, fingerprint=fingerprint, progress=progress
        )


@contextmanager
def open_dataset(cfg: PreparedDataConfig) -> Iterator[tuple[Path, Manifest]]:
    """The dataset ``cfg.dir`` and its manifest (a new one if none), locked: one prepare
    at a time appends (each extends the last vocabulary). Other settings are refused."""
    dataset = Path(cfg.dir).expanduser()
    _check_dataset_dir(dataset)
    settings = shared_settings(cfg)
    (dataset / PARTITIONS_DIR).mkdir(parents=True, exist_ok=True)
    with _locked(dataset):
        if is_partitioned(dataset):
            manifest = Manifest.read(dataset)
            _check_same_settings(manifest, settings, dataset)
        else:
            manifest = Manifest(source=cfg.name, mapping=str(cfg.mapping), settings=settings)
        yield dataset, manifest


def append_partition(
    cfg: PreparedDataConfig,
    dataset: Path,
    manifest: Manifest,
    *,
    inputs: list[dict],
    fingerprint: str,
    progress: bool,
    bad_rows: list[BadRowLog] | None = None,
    settings: dict[str, Any] | None = None,
) -> PrepareResult:
    """Prepares ``cfg.raw`` as partition ``cfg.partition`` (not listed yet) and lists it
    last in ``manifest`` (written); call inside :func:`open_dataset`. ``bad_rows``: rows
    skipped before the pipeline, merged into the partition's ``metadata.json``;
    ``settings``: the data.* settings it records there (default: ``cfg``'s)."""
    name = cfg.partition
    parts = dataset / PARTITIONS_DIR
    vocab = str(cfg.mapping) == "vocab"
    base = dataset / manifest.partitions[-1].path if vocab and manifest.partitions else None
    _remove_stale(parts)
    work = parts / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    target = parts / name
    try:
        output = _run_pipeline(cfg, work, progress=progress, base_vocab=base)
        if bad_rows:
            pipeline = BadRowLog(file="", skip=True, **_log_fields(output.bad_rows))
            output.bad_rows = merge_bad_rows([*bad_rows, pipeline])
        meta = _finish(cfg, work, output, fingerprint=fingerprint, inputs=inputs, settings=settings)
        version = len(manifest.partitions) if vocab else None
        if vocab:
            meta.mapping["vocab_version"] = version
            meta.write(work)
        if target.exists():  # an unlisted partition of a killed prepare
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest.partitions.append(
        PartitionEntry(
            name=name,
            path=f"{PARTITIONS_DIR}/{name}",
            fingerprint=fingerprint,
            num_rows={split: info.num_rows for split, info in meta.splits.items()},
            table_rows=[f.num_embeddings for f in meta.features],
            vocab_version=version,
            vocab_ids=_vocab_sizes(target, meta) if vocab else [],
        )
    )
    manifest.write(dataset)  # last: now readers see the partition
    return PrepareResult(target, meta, up_to_date=False)


def shared_settings(cfg: PreparedDataConfig) -> dict[str, Any]:
    """The settings every partition of a dataset must share (as JSON values)."""
    settings = {k: v for k, v in fingerprint_settings(cfg).items() if k not in _PER_PARTITION}
    return json.loads(json.dumps(settings, default=str))


def _check_same_settings(manifest: Manifest, settings: dict[str, Any], dataset: Path) -> None:
    keys = sorted((set(settings) | set(manifest.settings)) - _PER_PARTITION)  # older manifests
    changed = [k for k in keys if settings.get(k) != manifest.settings.get(k)]
    if changed:
        diff = ", ".join(
            f"data.{k}={settings.get(k)!r} (dataset: {manifest.settings.get(k)!r})" for k in changed
        )
        raise PrepareError(
            f"{dataset}'s partitions were prepared with other settings: {diff}; a partition "
            "shares its dataset's settings (only data.raw / eval_raw / joins / on_bad_row "
            "differ): pass the dataset's values, or prepare into a new data.dir"
        )


def _check_dataset_dir(dataset: Path) -> None:
    if (dataset / METADATA_FILE).is_file():
        raise PrepareError(
            f"data.dir={dataset} holds one whole prepared dataset ({METADATA_FILE}), not "
            "partitions: prepare partitions into a directory of their own (a new data.dir), "
            "or drop data.partition"
        )
    if dataset.is_dir() and not is_partitioned(dataset):
        others = [p.name for p in dataset.iterdir() if p.name not in (LOCK_FILE, PARTITIONS_DIR)]
        if others:
            raise PrepareError(
                f"data.dir={dataset} exists and is not a partitioned dataset (no "
                f"manifest.json; it holds {sorted(others)[:3]}); pick a new or empty directory"
            )


@contextmanager
def _locked(dataset: Path) -> Iterator[None]:
    """One prepare at a time appends to a dataset (the vocabulary extends the last one)."""
    with open(dataset / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log_fields(bad_rows: dict) -> dict:
    return {"by_reason": dict(bad_rows["by_reason"]), "examples": list(bad_rows["examples"])}


def _vocab_sizes(partition: Path, meta: ShardMetadata) -> list[int]:
    sizes = []
    for spec in meta.features:
        path = vocab_path(partition, spec.name)
        sizes.append(int(np.load(path, mmap_mode="r").shape[0]) if path.is_file() else 0)
    return sizes


def _remove_stale(parts: Path) -> None:
    """Scratch directories of prepares that were killed (their process is gone)."""
    for stale in parts.glob(".*.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
