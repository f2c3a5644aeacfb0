"""The serving bundle: one directory a server loads with torch and fbgemm_gpu alone.

Written by the end-of-training export (``trainer.export=true``, into
``<run_dir>/bundle/``) and by ``python -m trainer.export CKPT`` (beside ``--out``)::

    bundle/model.pt2     torch.export program (compression/bundle.py): the quantized
                         tables as buffers read by FBGEMM's nbit lookup op, the dense
                         layers as aten ops; (dense, ids, lengths) -> probabilities
    bundle/schema.json   how raw rows become the program's inputs, and what it reached
    bundle/sample.pt     one eval batch and the scores the trainer computed for it
                         (a dict of tensors: torch.load(..., weights_only=True))
    bundle/vocab/<feature>.ids.npy   with mapping=vocab: row 2 + i is raw id ids[i]

``schema.json`` holds ``format`` (``torch.export``) and ``file``, the features in
input order with their id mapping (``hash``: row ``1 + id % (rows - 1)``, row 0
for a blank field; ``vocab``: the copied file, row 1 for an unknown id), the
multi-hot features, the dense columns with their transform and the train
split's mean/std (prepared data) or ``synthetic`` with ``num_dense``, the
inputs' and output's layout, the versions, and the eval metrics. Table data
(``source: table``) adds ``table`` (see :func:`table_schema`): the format, the
columns, label and threshold, each dense column's transform and mean/std, the
categorical and multi-hot columns (separator), buckets, joins (side tables:
key and columns) and the feature order, from the run's ``data`` config or, when
it does not describe the prepared features (``data=table data.dir=DIR`` alone),
from the settings prepare recorded in metadata.json; a bucket feature's mapping is
``bucket`` (row ``1 +`` its bucket, 0 missing). A hashed or managed-collision
model's program takes the raw ids and remaps them itself; each feature then
has ``id_management`` (compression/bundle_remap.py: ``TableRemap.describe``):
``kind`` (``hash`` / ``managed_collision``), ``rows``, ``input_size``, ``row``
(how an id becomes a row), a map's ``map_size`` and ``miss_row``, and
``blocks`` when it was trained on several ranks (each rank's block of ids and
rows).

Example::

    program = write_bundle(serving_program, source=source, directory=run_dir / "bundle",
                           sample=first_eval_batch, sample_scores=scores, data_config=cfg.data)
    add_metrics(run_dir / "bundle", {"auc": 0.74, "logloss": 0.48})
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import fbgemm_gpu
import torch
from torch import Tensor, nn
from torchrec.datasets.utils import Batch

from compression.bundle import PROGRAM_FILE, ServingProgram, load_program, save_program
from trainer.data.source import DataSource

BUNDLE_DIR = "bundle"
SCHEMA_FILE = "schema.json"
SAMPLE_FILE = "sample.pt"
SCHEMA_VERSION = 1


def write_bundle(
    program: ServingProgram,
    *,
    source: DataSource,
    directory: Path,
    sample: Batch,
    sample_scores: Tensor,
    data_config: Any = None,
) -> nn.Module:
    """Writes model.pt2 (``program`` exported), schema.json (no metrics yet) and
    sample.pt; returns the program as loaded back from disk (what a server runs).

    ``data_config``: the run's ``data`` section (table inputs are described from it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_program(program, directory / PROGRAM_FILE, num_dense=source.num_dense)
    schema = {
        "schema_version": SCHEMA_VERSION,
        "format": "torch.export",
        "file": PROGRAM_FILE,
        "inputs": {
            "dense": "float32[B, num_dense], transformed as in dense",
            "ids": "int64[N]: the rows of every feature's ids, feature-major",
            "lengths": "int64[num_features * B]: ids per (feature, sample), feature-major "
            "(torchrec's KeyedJaggedTensor order)",
        },
        "output": {"name": "probability", "shape": "float32[B]"},
        **data_schema(source, directory, data_config=data_config),
        "versions": versions(),
        "metrics": {},
    }
    if program.remap is not None:  # hashed / managed-collision tables: raw ids in
        schema["inputs"]["ids"] = (
            "int64[N]: every feature's raw ids (as a training batch carries them, before "
            "the id remap: the program applies each feature's id_management), feature-major"
        )
        for feature, remap in zip(schema["features"], program.remap.describe()):
            feature["id_management"] = remap
    (directory / SCHEMA_FILE).write_text(json.dumps(schema, indent=2))
    kjt = sample.sparse_features
    torch.save(
        {
            "dense": sample.dense_features.float().contiguous(),
            "ids": kjt.values().long().contiguous(),
            "lengths": kjt.lengths().long().contiguous(),
            "labels": sample.labels.float().flatten().contiguous(),
            "scores": sample_scores.float().flatten().contiguous(),
        },
        directory / SAMPLE_FILE,
    )
    return load_program(directory / PROGRAM_FILE)


def add_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    """Records the eval metrics the bundle reached in its schema.json."""
    path = directory / SCHEMA_FILE
    schema = json.loads(path.read_text())
    schema["metrics"] = metrics
    path.write_text(json.dumps(schema, indent=2))


def data_schema(source: DataSource, directory: Path, *, data_config: Any = None) -> dict[str, Any]:
    """``features`` and ``dense`` entries of schema.json for ``source``; with a vocabulary
    mapping, its files are copied into ``directory/vocab``."""
    meta = getattr(source, "meta", None)
    features = [
        {
            "name": f.name,
            "rows": f.num_embeddings,
            "multi_hot": f.max_ids_per_sample > 1,
            "max_ids_per_sample": f.max_ids_per_sample,
        }
        for f in source.features
    ]
    if meta is None:  # synthetic: ids are rows already, dense standard normal
        for f in features:
            f["mapping"] = {"kind": "synthetic"}
        dense = {"kind": "synthetic", "num_dense": source.num_dense}
        return {"source": "synthetic", "features": features, "dense": dense}
    kind = meta.mapping.get("kind", "hash")
    for f in features:
        if meta.source == "table" and f["name"].endswith("_bucket"):  # as prepare tells them
            f["mapping"] = {
                "kind": "bucket",
                "rows": f["rows"],
                "row": "1 + the number of bounds <= value (table.buckets)",
                "missing_row": 0,
            }
        elif kind == "vocab":
            vocab = Path(source.directory) / "vocab" / f"{f['name']}.ids.npy"
            if not vocab.is_file():
                raise FileNotFoundError(
                    f"{vocab} not found: the prepared data's vocabulary (metadata.json says "
                    "mapping=vocab); prepare the data again"
                )
            (directory / "vocab").mkdir(exist_ok=True)
            shutil.copyfile(vocab, directory / "vocab" / vocab.name)
            f["mapping"] = {
                "kind": "vocab",
                "file": f"vocab/{vocab.name}",
                "first_row": 2,
                "unknown_row": 1,
                "missing_row": 0,
            }
        else:
            f["mapping"] = {
                "kind": "hash",
                "rows": f["rows"],
                "row": "1 + id % (rows - 1)",
                "missing_row": 0,
            }
    norm = getattr(source, "_norm", None)
    dense: dict[str, Any] = {
        "kind": meta.source,
        "num_dense": meta.num_dense,
        "names": list(meta.dense_names),
        "transform": "criteo: log(1 + max(x, 0)) of the integer field"
        if meta.source == "criteo"
        else "as read from the table's dense columns (table.dense: each column's transform)",
        "norm": "none" if norm is None else "standardize",
        "mean": meta.dense_stats.get("mean", []),
        "std": meta.dense_stats.get("std", []),
        "missing": "0 after the norm (the mean)",
    }
    if norm is not None:
        # The float32 arrays the reader applies: (x - mean) * inv_std, missing -> 0.
        dense["mean_f32"] = norm[0].tolist()
        dense["inv_std_f32"] = norm[1].tolist()
    out = {"source": meta.source, "mapping": dict(meta.mapping), "features": features}
    out["dense"] = dense
    if meta.source == "table":
        out.update(table_schema(data_config, meta, dense))
    return out


def table_schema(data_config: Any, meta: Any, dense: dict[str, Any]) -> dict[str, Any]:
    """schema.json's ``table`` entry: how ``python -m trainer.predict`` reads raw table rows
    (the columns, label, dense transform and stats, id columns, joins, feature order), from
    the run's ``data`` config when it describes the prepared features, else from the
    settings prepare recorded in metadata.json (``settings_from``: ``run`` / ``prepare``);
    ``table`` is null and ``table_error`` says why when neither does."""
    from omegaconf import DictConfig, OmegaConf

    from trainer.data.data_configs import PreparedDataConfig, TableDataConfig
    from trainer.data.table_input import TableSpec, column_names, resolve_format
    from trainer.prepare import inputs_fingerprint, prepared_config

    run = OmegaConf.to_object(data_config) if isinstance(data_config, DictConfig) else data_config
    names = [f.name for f in meta.features]

    def describes(cfg: Any) -> bool:
        if not isinstance(cfg, TableDataConfig):
            return False
        spec = TableSpec.from_config(cfg)
        return bool(spec.label) and spec.feature_names == names and spec.dense == meta.dense_names

    cfg, settings_from = run, "run"
    if not describes(run):
        reader = run if isinstance(run, PreparedDataConfig) else None
        cfg, settings_from = prepared_config(meta.settings, reader=reader), "prepare"
    if not describes(cfg):
        if isinstance(run, TableDataConfig):
            spec = TableSpec.from_config(run)
            ran = f"label {spec.label!r}, features {spec.feature_names}, dense {spec.dense}"
        else:
            ran = f"{type(run).__name__}, not a data=table config"
        recorded = "others" if meta.settings else "none (written before prepare recorded them)"
        why = (
            f"the run's data config ({ran}) is not the prepared data's (features {names}, "
            f"dense {list(meta.dense_names)}) and of prepare's settings its metadata.json "
            f"records {recorded}: run the same prepare again (it records them, the shards "
            "stay), or train with the data.* settings prepare ran with"
        )
        return {"table": None, "table_error": why}
    spec = TableSpec.from_config(cfg)
    joins = []
    for j in cfg.joins:
        path = Path(j.raw)
        fmt = resolve_format(path, j.format)
        have = column_names(path, fmt) if path.is_file() else []
        joins.append({"raw": j.raw, "on": j.on, "format": str(j.format), "columns": have})
    stats = [dense.get(k) or [] for k in ("mean", "std", "mean_f32", "inv_std_f32")]
    table = {
        "format": str(cfg.format),
        "columns": spec.columns,
        "label": {"column": spec.label, "threshold": spec.label_threshold},
        "dense": [
            {
                "column": c,
                "transform": str(spec.dense_transform),
                **{k: v[i] for k, v in zip(("mean", "std", "mean_f32", "inv_std_f32"), stats) if v},
                "norm": dense["norm"],
            }
            for i, c in enumerate(spec.dense)
        ],
        "categorical": spec.categorical,
        "multi_hot": spec.multi_hot,
        "list_separator": spec.list_separator,
        "buckets": spec.buckets,
        "joins": joins,
        "feature_order": names,
        "on_bad_row": str(cfg.on_bad_row),
        "batch_rows": cfg.batch_rows,
        "settings_from": settings_from,
        # These data settings and prepare's inputs give prepare's fingerprint.
        "matches_prepare": inputs_fingerprint(cfg, meta.inputs) == meta.fingerprint,
    }
    return {"table": table}


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?")}
    for dist, key in (("torchrec", "torchrec"), ("shardrec", "shardrec")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "unknown"
    return out
