"""EvalMetrics against sklearn/numpy, in one process and over 2 real gloo ranks.

Tolerances: logloss, ne, calibration and ctr are float64 sums on both sides, so
they must agree to rel 1e-9 (only summation order differs); AUC is integrated
in float32 by torchmetrics, so abs 1e-6.
"""

import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

from tests.distributed import run_ranks
from trainer.report.metrics import EvalMetrics

BATCH_SIZE = 128
FLOAT64_REL = 1e-9
AUC_ABS = 1e-6


def _make_data(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with signal, labels drawn from a shifted copy (miscalibrated on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(num_samples, generator=gen)
    labels = torch.rand(num_samples, generator=gen) < torch.sigmoid(logits - 0.5)
    return logits, labels.float()


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    probs = 1.0 / (1.0 + np.exp(-logits.double().numpy()))
    y = labels.double().numpy()
    ctr = y.mean()
    logloss = log_loss(y, probs)
    entropy = -(ctr * math.log(ctr) + (1.0 - ctr) * math.log(1.0 - ctr))
    return {
        "auc": roc_auc_score(y, probs),
        "logloss": logloss,
        "ne": logloss / entropy,
        "calibration": probs.sum() / y.sum(),
        "ctr": ctr,
        "num_samples": float(len(y)),
    }


def _evaluate(metrics: EvalMetrics, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    for start in range(0, len(logits), BATCH_SIZE):
        end = start + BATCH_SIZE
        metrics.update(logits=logits[start:end], labels=labels[start:end])
    return metrics.compute()


def _assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    assert got["auc"] == pytest.approx(want["auc"], abs=AUC_ABS)
    for key in ("logloss", "ne", "calibration", "ctr", "num_samples"):
        assert got[key] == pytest.approx(want[key], rel=FLOAT64_REL), key


def test_single_process_matches_sklearn() -> None:
    # 1000 is not a multiple of the batch size: the ragged last batch counts too.
    logits, labels = _make_data(1000, seed=0)
    metrics = EvalMetrics(rank=0, world_size=1, batch_size=BATCH_SIZE, num_samples=len(logits))
    got = _evaluate(metrics, logits, labels)
    want = _reference(logits, labels)
    _assert_matches(got, want)
    # The data is deliberately miscalibrated, so this is not a trivial 1.0.
    assert got["calibration"] > 1.1


def test_auc_counts_ties_as_half() -> None:
    # 5 distinct logits: torchrec's AUCMetric gets these wrong, sklearn does not.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randint(-2, 3, (1000,), generator=gen).float()
    labels = (torch.rand(1000, generator=gen) < torch.sigmoid(logits)).float()
    metrics = EvalMetrics(rank=0, world_size=1, batch_size=BATCH_SIZE, num_samples=1000)
    got = _evaluate(metrics, logits, labels)
    assert got["auc"] == pytest.approx(_reference(logits, labels)["auc"], abs=AUC_ABS)

    constant = EvalMetrics(rank=0, world_size=1, batch_size=4, num_samples=8)
    constant.update(logits=torch.zeros(8), labels=torch.tensor([0, 1] * 4))
    assert constant.compute()["auc"] == 0.5


def test_saturated_logits_keep_their_loss() -> None:
    # float32 sigmoid(20) is exactly 1.0, which torchrec would clamp to a loss
    # of 27.6 nats; in float64 the confident miss costs its true ~20 nats.
    metrics = EvalMetrics(rank=0, world_size=1, batch_size=4, num_samples=4)
    metrics.update(
        logits=torch.tensor([20.0, -20.0, 2.0, -2.0]),
        labels=torch.tensor([0.0, 1.0, 1.0, 0.0]),
    )
    got = metrics.compute()
    want_logloss = (2 * math.log1p(math.exp(20.0)) + 2 * math.log1p(math.exp(-2.0))) / 4
    assert got["logloss"] == pytest.approx(want_logloss, rel=1e-9)


def test_single_class_gives_nan_auc_and_ne() -> None:
    metrics = EvalMetrics(rank=0, world_size=1, batch_size=4, num_samples=8)
    metrics.update(logits=torch.randn(8), labels=torch.zeros(8))
    got = metrics.compute()
    assert math.isnan(got["auc"]) and math.isnan(got["ne"])
    assert got["ctr"] == 0.0


def test_sample_count_mismatch_warns_and_empty_eval_raises() -> None:
    logits, labels = _make_data(100, seed=2)
    metrics = EvalMetrics(rank=0, world_size=1, batch_size=BATCH_SIZE, num_samples=128)
    with pytest.warns(UserWarning, match="expected num_samples=128"):
        got = _evaluate(metrics, logits, labels)
    assert got["num_samples"] == 100.0

    empty = EvalMetrics(rank=0, world_size=1, batch_size=BATCH_SIZE, num_samples=10)
    with pytest.raises(ValueError, match="no samples"):
        empty.compute()


# name -> (global samples, samples given to rank 0); rank 1 gets the rest.
_SPLITS = {"uneven": (1200, 700), "rank1_empty": (300, 300)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # A missed collective fails the test instead of hanging it.
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name, (num_samples, rank0_share) in _SPLITS.items():
            logits, labels = _make_data(num_samples, seed=3)
            local = slice(0, rank0_share) if rank == 0 else slice(rank0_share, None)
            metrics = EvalMetrics(
                rank=rank,
                world_size=world_size,
                batch_size=BATCH_SIZE,
                num_samples=num_samples,
            )
            results[name] = _evaluate(metrics, logits[local], labels[local])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_gloo_ranks_match_full_data_reference(tmp_path: Path) -> None:
    world_size = 2
    run_ranks(_worker, world_size, _free_port(), str(tmp_path), world_size=world_size)
    per_rank = [
        json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)
    ]
    for name, (num_samples, _) in _SPLITS.items():
        want = _reference(*_make_data(num_samples, seed=3))
        for rank in range(world_size):
            _assert_matches(per_rank[rank][name], want)
        # Not just close: both ranks computed from the same gathered state.
        assert per_rank[0][name] == per_rank[1][name]
