"""``sharding.replica_sync_every=N``: how far K = 2 replicas synced every N steps drift.

4 gloo ranks as 2 groups of 2 (row-wise tables) train the tiny DLRM of
tests/test_sharding_equivalence.py for 12 steps with ReplicaSync every 1, 3 and
6 steps, against the unsharded reference of the same global batch. N = 1 must
match the reference at the equivalence tests' tolerances (the exact path);
N > 1 is not the K = 1 trajectory: after the final sync both groups' copies
must be equal, and the loss and row differences from the reference are printed
(docs/scaling.md quotes them). Slow tier: three 4-rank runs on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

import tests.test_sharding_equivalence as eq
from sharding import destroy_distributed, init_distributed
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.session import build

STEPS = 12
EVERY = [1, 3, 6]


def _config(case: str):  # noqa: ANN202 - tests' Config
    cfg = eq.tiny_config("row_wise")
    cfg.sharding.replicas = 2
    return cfg


def _worker(rank: int, out_dir: str) -> None:
    eq.NUM_STEPS = STEPS  # this process's tiny_config: 12 steps
    env = init_distributed(device="cpu")
    try:
        for every in EVERY:
            cfg = _config("row_wise")
            built = build(cfg, env)
            built.optimizer.replica_sync.every = every  # what sharding.replica_sync_every sets
            load_unsharded(built.model, torch.load(Path(out_dir) / "init.pt"))
            pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
            batches = rank_batches(
                SyntheticCriteo(cfg.data), "train", batch_size=eq.BATCH_SIZE, rank=rank,
                world_size=env.world_size, num_batches=STEPS,
            )  # fmt: skip
            losses = []
            for loss, _logits, _labels in drain(pipeline, batches):
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                losses.append(float(loss) / env.world_size)
            built.optimizer.replica_sync.flush()  # steps after the last sync
            shards = local_shards(built.model)
            torch.save({"losses": losses, "shards": shards}, Path(out_dir) / f"e{every}-r{rank}.pt")
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.dist
def test_sync_every_n_divergence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eq, "NUM_STEPS", STEPS)
    cfg = _config("row_wise")
    torch.manual_seed(0)
    init = eq.unsharded_model(cfg, device=torch.device("cpu")).state_dict()
    torch.save(init, tmp_path / "init.pt")
    run_ranks(_worker, str(tmp_path), world_size=4, local_world_size=4)
    names = {k.split("embedding_bags.")[1].split(".")[0] for k in init if "embedding_bags." in k}
    plan = {name: ("row_wise", [0, 1]) for name in names}
    ref_losses, ref_tables = eq._reference(cfg, init, 4, plan)
    for every in EVERY:
        ranks = [torch.load(tmp_path / f"e{every}-r{r}.pt") for r in range(4)]
        loss_diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], ref_losses, strict=True))
        row_diff = row_move = 0.0
        for key, ref in ref_tables.items():
            shape = tuple(ref.shape)
            group0 = assemble([ranks[r]["shards"].get(key, []) for r in (0, 2)], shape)
            group1 = assemble([ranks[r]["shards"].get(key, []) for r in (1, 3)], shape)
            torch.testing.assert_close(group0, group1, atol=1e-6, rtol=0, msg=key)
            row_diff = max(row_diff, float((group0 - ref).abs().max()))
            row_move = max(row_move, float((ref - init[key]).abs().max()))
        print(
            f"sync every {every}: max loss diff {loss_diff:.2e}, max row diff {row_diff:.2e} "
            f"(reference rows moved up to {row_move:.2e}) over {STEPS} steps"
        )
        if every == 1:
            assert loss_diff <= eq.LOSS_ATOL and row_diff <= eq.ROW_ATOL
        else:
            assert row_diff > eq.ROW_ATOL  # not the K = 1 trajectory; the figure is the drift
