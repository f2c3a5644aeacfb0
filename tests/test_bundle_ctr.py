"""DeepFM and Wide&Deep get a serving bundle that loads and scores without shardrec.

Tiny one-process runs with ``trainer.export=true``: a DeepFM under int4 table
QAT and int8 dense QAT (the streamed export: field and wide tables packed one
at a time, compression/bundle.py's two collections and the CTR head), and a
Wide&Deep student distilled from a DLRM-DCNv2 teacher (the rank-0 export of
the quantized student). The bundle loads in a fresh interpreter without
shardrec or torchrec (tests/test_bundle.py), its sample scores equal the
stored ones, its eval AUC equals the export's, and the served model computes
what QAT's eval computed (``max_abs_logit_diff``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compression.bundle import load_program
from tests.test_bundle import _run, load_in_fresh_interpreter
from trainer.data import SyntheticCriteo, SyntheticDataConfig, eval_batches
from trainer.report.metrics import binary_auc

CASES = {
    "deepfm-qat-int4-dense-int8": (["model=deepfm", "qat=int4", "qat.dense_bits=8"], True),
    "distill-dcn-to-wide_deep-int4": (
        [
            "model=dlrm_dcnv2",
            "distill=online",
            "distill.arch=wide_deep",
            "distill.student_qat_bits=4",
        ],
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ctr_bundle_scores_without_shardrec(tmp_path: Path, compose_cfg, case: str) -> None:
    overrides, streamed = CASES[case]
    summary = _run(tmp_path / "run", compose_cfg, *overrides)
    export = summary["export"]
    assert "bundle_error" not in export, export
    assert export["path"] == "bundle", export
    assert bool(export.get("streamed")) == streamed
    assert export["max_abs_logit_diff"] <= 1e-5, export  # QAT parity
    assert export["bundle_max_abs_diff"] <= 1e-6, export
    bundle = tmp_path / "run" / "bundle"

    # The program holds both collections: the field tables and the wide ones.
    program = load_program(bundle / "model.pt2")
    buffers = dict(program.named_buffers())
    assert {"tables.weights", "wide.weights"} <= buffers.keys(), sorted(buffers)
    sizes = buffers["tables.weights"].numel() + buffers["wide.weights"].numel()
    if streamed:
        assert sizes == export["table_bytes"]
    else:  # torchrec's quantized collections, counted with their TBEs' padding
        assert 0 < sizes <= export["table_bytes"]

    source = SyntheticCriteo(SyntheticDataConfig(num_eval_samples=2048))
    batches, labels = [], []
    for batch in eval_batches(source, batch_size=512, rank=0, world_size=1):
        kjt = batch.sparse_features
        batches.append((batch.dense_features, kjt.values().long(), kjt.lengths().long()))
        labels.append(batch.labels.flatten())
    got = load_in_fresh_interpreter(bundle, batches, tmp_path / "server")
    assert got["loaded"] == 0  # neither shardrec nor torchrec was imported

    sample = torch.load(bundle / "sample.pt", weights_only=True)
    diff = float((got["sample"] - sample["scores"]).abs().max())
    print(f"{case}: bundle vs trainer's scores max |diff| {diff:.3g}, auc {export['auc']}")
    assert diff <= 1e-5
    assert binary_auc(got["eval"], torch.cat(labels).float()) == export["auc"]
