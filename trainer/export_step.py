"""End of training: export the quantized serving model and check it (``trainer.export``).

Every rank sends its table shards to rank 0 (``gather_full_state``); rank 0
alone then

1. builds the unsharded fp32 model on cpu and loads the gathered weights;
2. quantizes it (``quantize_for_serving``) with the QAT bits of the run, or
   ``trainer.export_bits`` for every table when QAT was off (post-training
   quantization, the baseline QAT is meant to beat); with ``qat.dense_bits=8``
   the dense Linears become int8 weight-only (``quantize_dense_for_serving``).
   Saves it to ``exported_model.pt``;
3. evaluates it on the whole eval set, and the trained model's own eval forward
   on the same samples: the fp32 model with its QAT tables fake-quantized
   (exactly what QAT's eval computes, row by row) and, with dense QAT, its
   Linears still parametrized as in training; or plain fp32 without QAT.

``summary.json`` gets a nested ``"export"`` entry::

    "export": {"auc": 0.74, "logloss": 0.48, "bytes": 1234, "fp32_bytes": 4567,
               "bits": {"t_cat_0": 4, ...}, "dense_bits": 0, "max_abs_logit_diff": 0.0,
               "path": "exported_model.pt"}

``max_abs_logit_diff`` is ~0 with QAT (serving sees what training saw) and the
post-training quantization error without it. Rank 0 broadcasts the result (or
its error) so all ranks return, or raise, together.

:func:`export_checkpoint` does steps 1-3 in one process from a saved checkpoint
instead (``python -m compression.export <run_dir>/checkpoints/step_N``), reading
the table shards with DCP rather than gathering them.

Example::

    summary = export_step(cfg, model=built.model, env=env, source=source,
                          run_dir=run_dir, summary=summary, logger=logger)
    result = export_checkpoint(Path("outputs/run/checkpoints/step_2000"), bits=4)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from compression.dense_qat import enable_dense_qat, quantize_dense_for_serving
from compression.export import (
    fake_quantize_tables,
    gather_full_state,
    model_bytes,
    quantize_for_serving,
    save_exported,
    table_bytes,
)
from sharding import DistEnv
from trainer.build import build_unsharded
from trainer.checkpoint import is_complete, load_unsharded_model, missing_message, read_config
from trainer.config import Config, qat_bits, resolved_tables
from trainer.data import SyntheticCriteo, eval_batches
from trainer.logger import MetricsLogger

log = logging.getLogger(__name__)

EXPORT_FILE = "exported_model.pt"


def export_bits(cfg: Config) -> dict[str, int]:
    """The QAT bits per table, or ``trainer.export_bits`` for all when QAT was off."""
    bits = qat_bits(cfg)
    if bits:
        return bits
    return {t.name: cfg.trainer.export_bits for t in resolved_tables(cfg)}


def build_trained(cfg: Config) -> nn.Module:
    """The unsharded cpu model the trained state dict loads into, dense QAT included.

    Dense QAT renames each Linear's weight to ``parametrizations.weight.original``.
    """
    trained = build_unsharded(cfg, device=torch.device("cpu"))
    if cfg.qat.dense_bits:
        enable_dense_qat(trained)
    return trained


def export_step(
    cfg: Config,
    *,
    model: nn.Module,
    env: DistEnv,
    source: SyntheticCriteo,
    run_dir: Path,
    summary: dict[str, Any],
    logger: MetricsLogger,
) -> dict[str, Any]:
    """Collective: exports on rank 0; returns ``summary`` with ``"export"`` on every rank."""
    full_state = gather_full_state(model)
    result: list[Any] = [None]
    if full_state is not None:
        try:
            trained = build_trained(cfg)
            trained.load_state_dict(full_state)
            result[0] = export_model(cfg, trained, source=source, path=run_dir / EXPORT_FILE)
            result[0]["path"] = EXPORT_FILE  # relative to the run directory
        except Exception as err:  # handed to every rank below, then raised everywhere
            log.exception("export failed")
            result[0] = f"{type(err).__name__}: {err}"
    if dist.is_initialized() and env.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], str):
        raise RuntimeError(f"trainer.export failed on rank 0: {result[0]}")
    summary = {**summary, "export": result[0]}
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.summary({"export": result[0]})
    return summary


def export_model(
    cfg: Config,
    trained: nn.Module,
    *,
    source: SyntheticCriteo,
    path: Path,
    bits: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One process: quantizes the unsharded trained model, saves it to ``path``, scores it.

    ``trained`` is :func:`build_trained` holding the trained fp32 weights; its
    QAT tables are fake-quantized in place (to compute the trained model's eval
    forward). ``bits``: per table, default :func:`export_bits`. Returns the
    ``"export"`` entry of the summary.
    """
    bits = bits or export_bits(cfg)
    dlrm = trained.model  # the predictor, without DLRMTrain's loss
    dlrm.eval()
    dense_bits = cfg.qat.dense_bits
    served_dense = quantize_dense_for_serving(dlrm) if dense_bits else dlrm
    exported = quantize_for_serving(served_dense, table_bits=bits)
    del served_dense
    save_exported(exported, path)
    # Before any forward: the first one adds a small cached buffer (feature order).
    exported_bytes, fp32_bytes = model_bytes(exported), model_bytes(dlrm)
    tables, fp32_tables = table_bytes(exported), table_bytes(dlrm)
    # The trained model's eval forward: QAT tables hold their served rows (dense
    # QAT Linears already read their int8 values through their parametrizations).
    fake_quantize_tables(dlrm, table_bits=qat_bits(cfg))
    served_logits, trained_logits, labels = _eval_logits(
        [exported, dlrm], source, batch_size=cfg.trainer.eval_batch_size
    )
    result = {
        "auc": float(binary_auroc(torch.sigmoid(served_logits), labels.long())),
        "logloss": float(F.binary_cross_entropy_with_logits(served_logits, labels)),
        "bytes": exported_bytes,
        "fp32_bytes": fp32_bytes,
        # The tables alone: the dense layers are fp32, or int8 with qat.dense_bits=8.
        "table_bytes": tables,
        "fp32_table_bytes": fp32_tables,
        "bits": bits,
        "dense_bits": dense_bits,
        "max_abs_logit_diff": float((served_logits - trained_logits).abs().max()),
        "path": str(path),
    }
    log.info(
        "exported %s: auc %.4f, %d bytes (fp32 %d, %.2fx smaller), max |logit diff| %.3g",
        path,
        result["auc"],
        exported_bytes,
        fp32_bytes,
        fp32_bytes / exported_bytes,
        result["max_abs_logit_diff"],
    )
    return result


def export_checkpoint(
    checkpoint: Path, *, bits: int | None = None, out: Path | None = None
) -> dict[str, Any]:
    """One process, no process group: the serving model of a saved checkpoint.

    Rebuilds the unsharded model from the checkpoint's ``config.yaml``, reads
    every rank's table shards into it (DCP), and exports it as the end of that run
    would have: the run's QAT bits, or ``bits`` for every table. Saves ``out``
    (default ``<checkpoint>/exported_model.pt``) and the result next to it as
    ``.json``. Raises FileNotFoundError when ``checkpoint`` is missing or incomplete.
    """
    if not is_complete(checkpoint):
        raise FileNotFoundError(missing_message(checkpoint, key="checkpoint_dir"))
    cfg = read_config(checkpoint)
    trained = build_trained(cfg)
    step = load_unsharded_model(checkpoint, trained)
    out = out or checkpoint / EXPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_model(
        cfg,
        trained,
        source=SyntheticCriteo(cfg.data),
        path=out,
        bits={t.name: bits for t in resolved_tables(cfg)} if bits else None,
    )
    result["step"] = step
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def _eval_logits(
    models: list[nn.Module], source: SyntheticCriteo, *, batch_size: int
) -> tuple[torch.Tensor, ...]:
    """Each model's logits over the whole eval set (one process), then the labels."""
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for batch in eval_batches(source, batch_size=batch_size, rank=0, world_size=1):
        for out, m in zip(logits, models):
            out.append(m(batch.dense_features, batch.sparse_features).flatten())
        labels.append(batch.labels.flatten().float())
    return (*(torch.cat(out) for out in logits), torch.cat(labels))
