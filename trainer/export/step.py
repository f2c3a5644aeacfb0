"""End of training: export the quantized serving model and check it (``trainer.export``).

Streamed (trainer/export/stream.py), for DLRMs, DeepFM and Wide&Deep (field
and wide tables alike) under table QAT, dense QAT and converters with no export
hooks: every rank packs its own table shards (the
run's QAT bits, or ``trainer.export_bits`` for every table when QAT was off --
post-training quantization, the baseline QAT is meant to beat), and the packed
rows meet on rank 0 one table at a time; no rank holds more than its shards and
one table in flight, and rank 0 the packed (served) tables. Rank 0 then

1. loads the dense layers (replicated: its own) into the trained model built
   with its tables on ``meta`` (int8 weight-only dense Linears with dense QAT);
2. builds the served program over the packed rows (compression/bundle.py) and
   writes the serving bundle ``bundle/`` (trainer/export/bundle.py: a
   ``torch.export`` program over FBGEMM's nbit lookup op, schema.json,
   sample.pt), which loads with torch and fbgemm_gpu alone. Nothing is pickled;
3. scores the whole eval set with the program as loaded from disk, and with the
   trained model's eval forward (the QAT tables as QAT computed them, tables
   served with other bits in fp32; dense QAT Linears still parametrized).

Hashed and managed-collision DLRMs (``model.id_management``) are streamed too:
each table's remap state (a map, row-wise sharded like its rows) meets on rank 0
with its rows and is loaded into the trained model there, and the program
remaps the raw ids as the sharded model did (trainer/export/remap.py).

Other runs (row pruning, distillation: a DLRM, DeepFM or Wide&Deep student)
are gathered whole onto rank 0 (``compression.serving.gather_full_state``) and
exported by :func:`export_model` through torchrec's quantized modules; a model
of no family the program builder knows (compression/bundle.py: ``family``) gets
no bundle (``bundle_error``, ``path`` null).

The summary gets a nested ``"export"`` entry::

    "export": {"auc": 0.74, "logloss": 0.48, "bytes": 1234, "fp32_bytes": 4567,
               "bits": {"t_cat_0": 4, ...}, "dense_bits": 0, "max_abs_logit_diff": 0.0,
               "bundle_max_abs_diff": 0.0, "path": "bundle", "streamed": true}

``auc`` is the bundle program's (as loaded from disk), ``logloss`` the eager
served model's; ``bundle_max_abs_diff`` is the program's largest probability
difference from the eager served model (measured: 0).
``max_abs_logit_diff`` is ~0 with QAT (serving sees what training saw) and the
post-training quantization error without it.

The dense layers are served in fp32, whatever dtype training's autocast ran them
in (``precision=bf16``/``fp16``), and the trained eval of step 3 runs without
autocast too, so the parity check compares like with like
(tests/test_precision_qat.py). Training's own evals ran under autocast: the
export's AUC may differ from the summary's by what bf16 changes in the logits.
Rank 0 broadcasts the result (or its error) so all ranks return, or raise,
together.

``trainer/export/offline.py`` (``python -m trainer.export <run_dir>/checkpoints/step_N``)
does the same in one process from a saved checkpoint, reading one table at a
time from it.

Example::

    summary["export"] = export_step(built.model, model_config=cfg.model,
                                    converters=built.converters, tables=built.tables,
                                    source=source, eval_batch_size=512, run_dir=run_dir,
                                    data_config=cfg.data)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.datasets.utils import Batch

from compression.bundle import (
    PackedTable,
    ServingProgram,
    UnsupportedModel,
    build_program,
    program_head,
    serving_program,
)
from compression.converter import Converters
from compression.dense_qat import DenseQAT
from compression.serving import gather_full_state, model_bytes, table_bytes
from sharding.collectives import broadcast_object
from trainer.builder.model import build_trained, build_unsharded
from trainer.config.schema import ModelConfig
from trainer.config.tables import RunTables
from trainer.data.source import DataSource
from trainer.export.bundle import BUNDLE_DIR, add_metrics, write_bundle
from trainer.export.remap import id_remap
from trainer.export.stream import (
    TablePacks,
    TableSpec,
    dense_state,
    load_dense,
    packed_table,
    sharded_tables,
    streamable,
    table_specs,
)
from trainer.report.metrics import binary_auc

log = logging.getLogger(__name__)

Logits = Callable[[Batch], Tensor]


def export_step(
    model: nn.Module,
    *,
    model_config: ModelConfig,
    converters: Converters,
    tables: RunTables,
    source: DataSource,
    eval_batch_size: int,
    run_dir: Path,
    data_config: Any = None,
) -> dict[str, Any]:
    """Collective: exports on rank 0; returns the ``"export"`` entry on every rank.

    ``data_config``: the run's ``data`` section, described in the bundle's schema.
    """
    # Collective, as at a checkpoint: state the ranks hold apart meets on rank 0
    # (row pruning's access counts, summed), where the export reads it.
    converters.state_dict()
    meta = meta_trained(
        model_config, tables=tables, num_dense=source.num_dense, converters=converters
    )
    why_not = streamable(converters, meta)
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: Any = None
    bundle = run_dir / BUNDLE_DIR
    common = {"source": source, "batch_size": eval_batch_size, "bundle": bundle}
    if why_not is None:
        specs = table_specs(meta, converters)
        stream = sharded_tables(model, specs)
        if rank == 0:
            try:
                dense = dense_state(model, skip={t.key for t in specs})
                result = export_streamed(
                    meta,
                    specs,
                    stream,
                    dense,
                    converters=converters,
                    data_config=data_config,
                    **common,
                )
            except Exception as err:  # handed to every rank below, then raised everywhere
                log.exception("export failed")
                result = f"{type(err).__name__}: {err}"
        for _ in stream:  # the other ranks' part of the collective (rank 0: any left)
            pass
    else:
        log.info("export: the whole model meets on rank 0 (%s)", why_not)
        full_state = gather_full_state(model)
        if full_state is not None:
            try:
                trained = build_trained(
                    model_config, tables=tables, num_dense=source.num_dense, converters=converters
                )
                trained.load_state_dict(full_state)
                del full_state
                result = export_model(
                    trained, converters=converters, data_config=data_config, **common
                )
            except Exception as err:
                log.exception("export failed")
                result = f"{type(err).__name__}: {err}"
    if isinstance(result, dict) and result.get("path"):
        result["path"] = str(Path(result["path"]).relative_to(run_dir))
    result = broadcast_object(result)
    if isinstance(result, str):
        raise RuntimeError(f"trainer.export failed on rank 0: {result}")
    return result


def meta_trained(
    model_config: ModelConfig, *, tables: RunTables, num_dense: int, converters: Converters
) -> nn.Module:
    """The trained model's modules on ``meta`` (converters' wrap_model applied)."""
    model = build_unsharded(
        model_config, tables=tables, num_dense=num_dense, device=torch.device("meta")
    )
    return converters.wrap_model(model)


def export_streamed(
    trained: nn.Module,
    specs: list[TableSpec],
    stream: Iterator[tuple[TableSpec, TablePacks | None]],
    dense: dict[str, Tensor],
    *,
    converters: Converters,
    source: DataSource,
    batch_size: int,
    bundle: Path,
    data_config: Any = None,
) -> dict[str, Any]:
    """Rank 0 (or one process): the served and trained programs from the packed tables
    ``stream`` yields and the ``dense`` state, the bundle written, the eval scored.

    ``trained`` is :func:`meta_trained`; its dense layers (and the remap state of a
    hashed or managed-collision model) are loaded in place.
    """
    served: dict[str, PackedTable] = {}
    as_trained: dict[str, PackedTable] = {}
    row_blocks: dict[str, list[int]] = {}
    dense = dict(dense)
    for spec, packs in stream:
        assert packs is not None, "rank 0 receives every table"
        served[spec.name] = packed_table(spec, packs, spec.served)
        if spec.trained != spec.served:
            as_trained[spec.name] = packed_table(spec, packs, spec.trained)
        row_blocks[spec.name] = packs.row_blocks
        dense.update(packs.remap_state)
    load_dense(trained, dense, tables={t.key for t in specs}, converters=converters)
    model = trained.model.eval()  # a DLRM, DeepFM or Wide&Deep (compression.bundle.family)
    served_dense = model
    for c in converters:
        if isinstance(c, DenseQAT):
            served_dense = c.to_serving(model)
    fp32_tables = sum(t.rows * t.dim * 4 for t in specs)
    feature_names = [f.name for f in source.features]
    remap = id_remap(model, row_blocks=row_blocks, feature_names=feature_names)
    trained_program = None
    if as_trained:  # the trained eval reads other rows than serving for these tables
        tables = {name: as_trained.get(name, table) for name, table in served.items()}
        trained_program = build_program(
            tables, model=model, feature_names=feature_names, remap=remap
        )
    program = build_program(
        served, model=model, head_model=served_dense, feature_names=feature_names, remap=remap
    )
    if trained_program is None:
        collections = program.collections
        head = program_head(model, collections)
        trained_program = ServingProgram(collections, head, remap).eval()
    sizes = {
        "bytes": program.table_bytes() + model_bytes(program.head),
        "fp32_bytes": fp32_tables + model_bytes(trained_program.head),
        "table_bytes": program.table_bytes(),
        "fp32_table_bytes": fp32_tables,
    }
    result = _score_and_write(
        _logits_of(program),
        _logits_of(trained_program),
        program,
        source=source,
        batch_size=batch_size,
        bundle=bundle,
        sizes=sizes,
        converters=converters,
        data_config=data_config,
    )
    result["streamed"] = True
    return result


def _logits_of(program: ServingProgram) -> Logits:
    def logits(batch: Batch) -> Tensor:
        kjt = batch.sparse_features
        return program.logits(batch.dense_features, kjt.values().long(), kjt.lengths().long())

    return logits


def export_model(
    trained: nn.Module,
    *,
    converters: Converters,
    source: DataSource,
    batch_size: int,
    bundle: Path,
    data_config: Any = None,
) -> dict[str, Any]:
    """One process, the whole model: the serving model of ``trained`` (torchrec's quantized
    modules, ``converters.to_serving``), its bundle written to ``bundle``, scored.

    ``trained`` is :func:`build_trained` holding the trained fp32 weights; it is
    changed in place into the trained model's eval forward. Returns the
    ``"export"`` entry of the summary (``path`` None when no bundle could be written).
    """
    dlrm = trained.model  # the predictor, without DLRMTrain's loss
    dlrm.eval()
    exported = converters.to_serving(dlrm)
    # Before any forward: the first one adds a small cached buffer (feature order).
    sizes = {
        "bytes": model_bytes(exported),
        "fp32_bytes": model_bytes(dlrm),
        "table_bytes": table_bytes(exported),
        "fp32_table_bytes": table_bytes(dlrm),
    }
    converters.as_trained_eval(dlrm)
    program: ServingProgram | None = None
    try:
        program = serving_program(exported, feature_names=[f.name for f in source.features])
    except UnsupportedModel as err:  # a model of no known family: scored eagerly, no bundle
        log.warning("no serving bundle: %s", err)
        sizes["bundle_error"] = str(err)
    return _score_and_write(
        lambda b: exported(b.dense_features, b.sparse_features).flatten(),
        lambda b: dlrm(b.dense_features, b.sparse_features).flatten(),
        program,
        source=source,
        batch_size=batch_size,
        bundle=bundle,
        sizes=sizes,
        converters=converters,
        data_config=data_config,
    )


@torch.no_grad()
def _score_and_write(
    served: Logits,
    trained: Logits,
    program: ServingProgram | None,
    *,
    source: DataSource,
    batch_size: int,
    bundle: Path,
    sizes: dict[str, Any],
    converters: Converters,
    data_config: Any,
) -> dict[str, Any]:
    """Writes the bundle of ``program`` (if any), then scores the whole eval set:
    ``served``'s and ``trained``'s logits, the loaded program's probabilities."""
    sample = next(iter(source.eval_batches(batch_size=batch_size, rank=0, world_size=1)))
    loaded = None
    if program is not None:
        loaded = write_bundle(
            program,
            source=source,
            directory=bundle,
            sample=sample,
            sample_scores=torch.sigmoid(served(sample)),
            data_config=data_config,
        )
    served_logits, trained_logits, scores, labels = [], [], [], []
    for batch in source.eval_batches(batch_size=batch_size, rank=0, world_size=1):
        served_logits.append(served(batch))
        trained_logits.append(trained(batch))
        if loaded is None:
            scores.append(torch.sigmoid(served_logits[-1]))
        else:
            kjt = batch.sparse_features
            scores.append(loaded(batch.dense_features, kjt.values().long(), kjt.lengths().long()))
        labels.append(batch.labels.flatten().float())
    s_logits, t_logits = torch.cat(served_logits), torch.cat(trained_logits)
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    result = {
        "auc": binary_auc(all_scores, all_labels),
        "logloss": float(F.binary_cross_entropy_with_logits(s_logits, all_labels)),
        **sizes,
        **converters.export_summary(),  # bits per table, dense_bits
        "max_abs_logit_diff": float((s_logits - t_logits).abs().max()),
        "bundle_max_abs_diff": float((all_scores - torch.sigmoid(s_logits)).abs().max()),
        "path": str(bundle) if loaded is not None else None,
    }
    if loaded is not None:
        add_metrics(bundle, {k: result[k] for k in ("auc", "logloss", "max_abs_logit_diff")})
    log.info(
        "exported %s: auc %.4f, %d bytes (fp32 %d, %.2fx smaller), max |logit diff| %.3g",
        bundle,
        result["auc"],
        result["bytes"],
        result["fp32_bytes"],
        result["fp32_bytes"] / result["bytes"],
        result["max_abs_logit_diff"],
    )
    return result
