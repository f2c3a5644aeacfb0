"""End of training: export the quantized serving model and check it (``trainer.export``).

Every rank sends its table shards to rank 0 (``gather_full_state``); rank 0
alone then

1. builds the unsharded fp32 model on cpu and loads the gathered weights;
2. asks the converters for the serving model (``Converters.to_serving``: the
   tables quantized with the QAT bits of the run, or ``trainer.export_bits``
   for every table when QAT was off -- post-training quantization, the
   baseline QAT is meant to beat; int8 weight-only dense Linears with dense
   QAT). Saves it to ``exported_model.pt`` (pickled, for shardrec's own tests)
   and writes the serving bundle ``bundle/`` (trainer/export/bundle.py: a
   ``torch.export`` program over FBGEMM's nbit lookup op, schema.json,
   sample.pt), which loads with torch and fbgemm_gpu alone;
3. evaluates it on the whole eval set, and the trained model's own eval forward
   on the same samples (``Converters.as_trained_eval``: the QAT tables
   fake-quantized, exactly what QAT's eval computes row by row; dense QAT
   Linears still parametrized as in training), with the eval metrics' AUC.

The summary gets a nested ``"export"`` entry::

    "export": {"auc": 0.74, "logloss": 0.48, "bytes": 1234, "fp32_bytes": 4567,
               "bits": {"t_cat_0": 4, ...}, "dense_bits": 0, "max_abs_logit_diff": 0.0,
               "bundle_max_abs_diff": 0.0, "path": "bundle"}

``auc`` is the bundle program's (as loaded from disk), ``logloss`` the eager
quantized model's; ``bundle_max_abs_diff`` is the program's largest probability
difference from the eager quantized model (measured: 0).
``max_abs_logit_diff`` is ~0 with QAT (serving sees what training saw) and the
post-training quantization error without it.

The dense layers are served in fp32, whatever dtype training's autocast ran them
in (``precision=bf16``/``fp16``): the served model is the fp32 dense weights
plus the quantized tables (``"dense_dtype": "fp32"`` and ``"train_autocast"`` in
the entry), and the trained eval of step 3 runs without autocast too, so the
parity check compares like with like: fp32 dense on both sides, the QAT tables
fake-quantized on one and quantized on the other. ``max_abs_logit_diff`` thus
stays <= 1e-5 for QAT tables under any ``precision`` (tests/test_precision_qat.py).
Training's own evals ran under autocast: the export's AUC may differ from the
summary's by what bf16 (8 significant bits, relative error <= 2**-8 per
operation) changes in the logits -- a difference of the dense dtype, not of the
quantization, and not part of the parity check. Rank 0 broadcasts the result (or
its error) so all ranks return, or raise, together.

``trainer/export/offline.py`` (``python -m trainer.export <run_dir>/checkpoints/step_N``)
does steps 1-3 in one process from a saved checkpoint instead, reading the
table shards with DCP rather than gathering them.

Example::

    summary["export"] = export_step(cfg, model=built.model, converters=built.converters,
                                    tables=built.tables, source=source, run_dir=run_dir)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression.bundle import UnsupportedModel
from compression.converter import Converters
from compression.serving import gather_full_state, model_bytes, save_exported, table_bytes
from sharding.collectives import broadcast_object
from trainer.builder.model import build_trained
from trainer.config.schema import ModelConfig
from trainer.config.tables import RunTables
from trainer.data.source import DataSource
from trainer.export.bundle import BUNDLE_DIR, add_metrics, write_bundle
from trainer.report.metrics import binary_auc

log = logging.getLogger(__name__)

EXPORT_FILE = "exported_model.pt"


def export_step(
    model: nn.Module,
    *,
    model_config: ModelConfig,
    converters: Converters,
    tables: RunTables,
    source: DataSource,
    eval_batch_size: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Collective: exports on rank 0; returns the ``"export"`` entry on every rank."""
    # Collective, as at a checkpoint: state the ranks hold apart meets on rank 0
    # (row pruning's access counts, summed), where to_serving reads it.
    converters.state_dict()
    full_state = gather_full_state(model)
    result: Any = None
    if full_state is not None:
        try:
            trained = build_trained(
                model_config, tables=tables, num_dense=source.num_dense, converters=converters
            )
            trained.load_state_dict(full_state)
            result = export_model(
                trained,
                converters=converters,
                source=source,
                batch_size=eval_batch_size,
                path=run_dir / EXPORT_FILE,
                bundle=run_dir / BUNDLE_DIR,
            )
            # Relative to the run directory (the pickled model when no bundle was written).
            result["path"] = EXPORT_FILE if "bundle_error" in result else BUNDLE_DIR
        except Exception as err:  # handed to every rank below, then raised everywhere
            log.exception("export failed")
            result = f"{type(err).__name__}: {err}"
    result = broadcast_object(result)
    if isinstance(result, str):
        raise RuntimeError(f"trainer.export failed on rank 0: {result}")
    return result


def export_model(
    trained: nn.Module,
    *,
    converters: Converters,
    source: DataSource,
    batch_size: int,
    path: Path,
    bundle: Path,
) -> dict[str, Any]:
    """One process: the serving model of ``trained`` (pickled to ``path``, and the
    serving bundle written to ``bundle``, see trainer/export/bundle.py), scored.

    ``trained`` is :func:`build_trained` holding the trained fp32 weights; it is
    changed in place into the trained model's eval forward. Returns the
    ``"export"`` entry of the summary; its ``auc``/``logloss`` are the bundle's
    program's (loaded back from disk), ``bundle_max_abs_diff`` its largest
    probability difference from the eager quantized model.
    """
    dlrm = trained.model  # the predictor, without DLRMTrain's loss
    dlrm.eval()
    exported = converters.to_serving(dlrm)
    save_exported(exported, path)
    # Before any forward: the first one adds a small cached buffer (feature order).
    exported_bytes, fp32_bytes = model_bytes(exported), model_bytes(dlrm)
    tables, fp32_tables = table_bytes(exported), table_bytes(dlrm)
    converters.as_trained_eval(dlrm)
    sample = next(iter(source.eval_batches(batch_size=batch_size, rank=0, world_size=1)))
    with torch.no_grad():
        sample_scores = torch.sigmoid(
            exported(sample.dense_features, sample.sparse_features).flatten()
        )
    try:
        program: nn.Module | None = write_bundle(
            exported, source=source, directory=bundle, sample=sample, sample_scores=sample_scores
        )
    except UnsupportedModel as err:  # e.g. DeepFM / Wide&Deep: the pickled model only
        log.warning("no serving bundle: %s", err)
        program, bundle_error = None, str(err)
    served_logits, trained_logits, scores, labels = _eval_logits(
        [exported, dlrm], source, batch_size=batch_size, program=program
    )
    result = {
        "auc": binary_auc(scores, labels),
        "logloss": float(F.binary_cross_entropy_with_logits(served_logits, labels)),
        "bytes": exported_bytes,
        "fp32_bytes": fp32_bytes,
        # The tables alone: the dense layers are fp32, or int8 with qat.dense_bits=8.
        "table_bytes": tables,
        "fp32_table_bytes": fp32_tables,
        **converters.export_summary(),  # bits per table, dense_bits
        "max_abs_logit_diff": float((served_logits - trained_logits).abs().max()),
        "bundle_max_abs_diff": float((scores - torch.sigmoid(served_logits)).abs().max()),
        "path": str(bundle),
    }
    if program is None:
        result.update(path=str(path), bundle_error=bundle_error)
    else:
        add_metrics(bundle, {k: result[k] for k in ("auc", "logloss", "max_abs_logit_diff")})
    log.info(
        "exported %s: auc %.4f, %d bytes (fp32 %d, %.2fx smaller), max |logit diff| %.3g",
        bundle,
        result["auc"],
        exported_bytes,
        fp32_bytes,
        fp32_bytes / exported_bytes,
        result["max_abs_logit_diff"],
    )
    return result


@torch.no_grad()
def _eval_logits(
    models: list[nn.Module], source: DataSource, *, batch_size: int, program: nn.Module | None
) -> tuple[torch.Tensor, ...]:
    """Each model's logits over the whole eval set (one process), the program's
    probabilities (without a program: the first model's), then the labels."""
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    scores, labels = [], []
    for batch in source.eval_batches(batch_size=batch_size, rank=0, world_size=1):
        for out, m in zip(logits, models):
            out.append(m(batch.dense_features, batch.sparse_features).flatten())
        kjt = batch.sparse_features
        if program is None:
            scores.append(torch.sigmoid(logits[0][-1]))
        else:
            scores.append(program(batch.dense_features, kjt.values().long(), kjt.lengths().long()))
        labels.append(batch.labels.flatten().float())
    return (*(torch.cat(out) for out in logits), torch.cat(scores), torch.cat(labels))
