"""The serving bundle loads and scores without shardrec, and scores what the trainer did.

A tiny one-process run (``qat=int4``, and an int8 post-training export) with
``trainer.export=true`` writes ``<run_dir>/bundle/``. A fresh interpreter (cwd a
temp dir, PYTHONPATH cleared, ``import trainer/compression/sharding`` made to
fail) loads ``model.pt2`` with ``torch.export.load`` and ``sample.pt`` with
``weights_only=True``, and scores the sample and the whole eval set: the
sample's scores equal the stored ones, and the eval AUC equals the export's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.processes import run
from tests.test_train_e2e import TINY
from trainer.config.schema import to_config
from trainer.data import SyntheticCriteo, SyntheticDataConfig, eval_batches
from trainer.report.metrics import binary_auc

# Run in the fresh interpreter: shardrec's packages cannot be imported there.
LOADER = r"""
import importlib.abc, sys
class _NoShardrec(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"trainer", "compression", "sharding", "tests"}:
            raise ImportError(f"{name}: shardrec is not installed on the server")
        return None
sys.meta_path.insert(0, _NoShardrec())
import fbgemm_gpu, torch  # fbgemm_gpu registers torch.ops.fbgemm
bundle, evals, out = sys.argv[1:4]
program = torch.export.load(bundle + "/model.pt2").module()
sample = torch.load(bundle + "/sample.pt", weights_only=True)
batches = torch.load(evals, weights_only=True)
with torch.no_grad():
    scores = program(sample["dense"], sample["ids"], sample["lengths"])
    eval_scores = torch.cat([program(*b) for b in batches])
shardrec = {"torchrec", "trainer", "compression", "sharding"}
loaded = sorted({m.partition(".")[0] for m in sys.modules} & shardrec)
torch.save({"sample": scores, "eval": eval_scores, "loaded": len(loaded)}, out)
print("loaded packages:", loaded)
"""


def _run(tmp_path: Path, compose_cfg, *overrides: str) -> dict:
    from trainer.train import train  # in this process: a world of one

    cfg = to_config(
        compose_cfg(
            [
                *TINY,
                "trainer.eval_every_steps=8",
                "trainer.export=true",
                "trainer.progress_bar=false",
                "trainer.plot=false",
                *overrides,
            ]
        )
    )
    return train(cfg, run_dir=tmp_path)


def load_in_fresh_interpreter(bundle: Path, batches: list, work: Path) -> dict:
    """Scores of ``bundle``'s sample and of ``batches`` from a python without shardrec."""
    work.mkdir(exist_ok=True)
    torch.save(batches, work / "eval.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run(
        [sys.executable, "-c", LOADER, str(bundle), str(work / "eval.pt"), str(work / "out.pt")],
        cwd=work,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / "out.pt", weights_only=True)


@pytest.mark.parametrize(
    "overrides",
    [["qat=int4", "qat.dense_bits=8"], ["trainer.export_bits=8"]],
    ids=["qat-int4-dense-int8", "ptq-int8"],
)
def test_bundle_scores_without_shardrec(tmp_path: Path, compose_cfg, overrides) -> None:
    summary = _run(tmp_path / "run", compose_cfg, *overrides)
    export = summary["export"]
    bundle = tmp_path / "run" / export["path"]
    assert export["path"] == "bundle" and (bundle / "model.pt2").is_file()
    for key in ("auc", "bytes", "fp32_bytes", "table_bytes", "max_abs_logit_diff"):
        assert key in export
    assert export["bundle_max_abs_diff"] == 0.0  # measured: the eager quantized model's bits

    schema = json.loads((bundle / "schema.json").read_text())
    assert schema["format"] == "torch.export" and schema["file"] == "model.pt2"
    assert [f["name"] for f in schema["features"]] == [f"cat_{i}" for i in range(26)]
    assert schema["dense"] == {"kind": "synthetic", "num_dense": 13}
    assert schema["output"]["name"] == "probability"
    assert set(schema["versions"]) == {"torch", "fbgemm_gpu", "torchrec", "shardrec"}
    assert schema["metrics"]["auc"] == export["auc"]

    source = SyntheticCriteo(SyntheticDataConfig(num_eval_samples=2048))
    batches, labels = [], []
    for batch in eval_batches(source, batch_size=512, rank=0, world_size=1):
        kjt = batch.sparse_features
        batches.append((batch.dense_features, kjt.values().long(), kjt.lengths().long()))
        labels.append(batch.labels.flatten())
    got = load_in_fresh_interpreter(bundle, batches, tmp_path / "server")
    assert got["loaded"] == 0  # neither shardrec nor torchrec was imported

    sample = torch.load(bundle / "sample.pt", weights_only=True)
    assert sample["dense"].dtype == torch.float32 and sample["ids"].dtype == torch.int64
    assert sample["lengths"].shape == (26 * sample["dense"].shape[0],)
    diff = float((got["sample"] - sample["scores"]).abs().max())
    print(f"{overrides}: bundle vs trainer's scores max |diff| {diff:.3g}, auc {export['auc']}")
    assert diff <= 1e-5  # measured: 0
    assert binary_auc(got["eval"], torch.cat(labels).float()) == export["auc"]
