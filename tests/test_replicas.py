"""``sharding.replicas=K``: K groups each shard every table, synced to the K = 1 run.

4 gloo ranks as 2 groups of 2 (group 0: ranks 0, 2; group 1: ranks 1, 3) train
the tiny DLRM of tests/test_sharding_equivalence.py and must match its
unsharded reference (losses, every table row) at the same tolerances, with
both groups' copies of each table equal. The same run from a nonzero row-wise
Adagrad accumulator (as after a resume), K = 1 and K = 2, matches a reference
whose table gradient is the global batch's mean: the sync once summed the K
groups' mean gradients, K times too much, unseen from a zero accumulator. A
checkpoint saved with K = 2 resumes with K = 1 and one saved with K = 1 resumes
with K = 2, onto the original run's step-8 metrics (slow tier). The planning
side (one group planned, costed for the world; ``replicas=auto``) is checked on
small worlds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

import tests.test_sharding_equivalence as eq
from sharding import DistEnv, destroy_distributed, init_distributed
from sharding.estimate import RankEstimate
from sharding.replica_plan import estimate_replicas, pick_replicas, replica_candidates, sync_ms
from sharding.replicas import _shard_pairs, group_ranks, parse_replicas
from sharding.state import assemble, load_unsharded, local_shards
from tests.distributed import run_ranks
from tests.reference import reference_optimizers, reference_step, unsharded_model
from tests.test_faults_kill import torchrun
from tests.test_resume_any_plan import SAVED, _compare
from trainer.config.schema import ConfigError, to_config
from trainer.data import SyntheticCriteo, rank_batches
from trainer.loop.train_pipeline import drain
from trainer.plan.cluster import plan_cluster
from trainer.session import build

CASES = ["rep_row_wise", "rep_table_wise"]


def _case_config(case: str):  # noqa: ANN202 - tests' Config
    cfg = eq.tiny_config(case.removeprefix("rep_"))
    cfg.sharding.replicas = 2
    return cfg


# Warm cases: row-wise Adagrad starts from a nonzero accumulator, as after a resume.
# From zero, the update lr g / sqrt(sum g^2) ignores the gradient's scale, so a sync
# summing K groups' mean gradients (K times the K = 1 gradient) matched anyway.
WARM_CASES = {"warm_k1_row_wise": 1, "warm_k2_row_wise": 2}
WARM_ACCUMULATOR = 0.01


def _warm_config(case: str):  # noqa: ANN202 - tests' Config
    cfg = eq.tiny_config(case.split("_", 2)[2])
    cfg.sharding.replicas = WARM_CASES[case]
    return cfg


def _train_warm(rank: int, env: DistEnv, case: str, out_dir: Path) -> None:
    cfg = _warm_config(case)
    built = build(cfg, env)
    load_unsharded(built.model, torch.load(out_dir / "warm-init.pt"))
    for _rows, acc, _lr in _shard_pairs(built.model.fused_optimizer):
        acc.fill_(WARM_ACCUMULATOR)
    pipeline = TrainPipelineSparseDist(built.model, built.optimizer, env.device)
    batches = rank_batches(
        SyntheticCriteo(cfg.data),
        "train",
        batch_size=eq.BATCH_SIZE,
        rank=rank,
        world_size=env.world_size,
        num_batches=eq.NUM_STEPS,
    )
    losses = []
    for loss, _logits, _labels in drain(pipeline, batches):
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / env.world_size)
    torch.save(
        {"losses": losses, "shards": local_shards(built.model)}, out_dir / f"{case}-rank{rank}.pt"
    )


def _warm_reference(init: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the global batch, tables' accumulators at WARM_ACCUMULATOR; the table
    gradient is the global batch's mean gradient (torchrec divides the backward all-to-all
    and reduce-scatter by the group size: a K = 1 world of any size trains the same)."""
    cfg = _warm_config("warm_k1_row_wise")
    model = unsharded_model(cfg, device=torch.device("cpu"))
    model.load_state_dict(init)
    bags = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    tables = [bag.weight for bag in bags.values()]
    optimizers = reference_optimizers(model, tables, cfg.optim)
    for table in tables:
        optimizers[-1].state[table]["sum"].fill_(WARM_ACCUMULATOR)
    source, global_batch = SyntheticCriteo(cfg.data), eq.BATCH_SIZE * 4
    losses = [
        reference_step(model, source.batch("train", step * global_batch, global_batch), optimizers)
        for step in range(eq.NUM_STEPS)
    ]  # fmt: skip
    rows = {
        k: bags[k.split(".")[-2]].weight.detach().clone() for k in init if "embedding_bags" in k
    }
    return losses, rows


def _worker(rank: int, cases: list[str], warm_cases: list[str], out_dir: str) -> None:
    eq._case_config = _case_config  # this process's equivalence helpers train our cases
    env = init_distributed(device="cpu")
    try:
        for case in cases:
            eq._train_case(rank, env, case, Path(out_dir))
        for case in warm_cases:
            _train_warm(rank, env, case, Path(out_dir))
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replicas")
    for case in CASES:
        torch.manual_seed(0)
        init = eq.unsharded_model(_case_config(case), device=torch.device("cpu")).state_dict()
        torch.save(init, out / f"{case}-init.pt")
    torch.manual_seed(0)
    init = eq.unsharded_model(_warm_config("warm_k1_row_wise"), device=torch.device("cpu"))
    torch.save(init.state_dict(), out / "warm-init.pt")
    run_ranks(_worker, CASES, list(WARM_CASES), str(out), world_size=4, local_world_size=4)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_two_groups_of_two_match_unsharded(
    case: str, two_groups: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eq, "_case_config", _case_config)
    plan = eq._check_equivalence(two_groups, case, world_size=4)
    print(f"{case}: loss diff {plan['_max_loss_diff']:.1e}, row diff {plan['_max_row_diff']:.1e}")
    assert {v[0] for k, v in plan.items() if k.startswith("t_")} == {case.removeprefix("rep_")}
    # Both groups hold every table, and their copies are the same rows.
    ranks = [torch.load(two_groups / f"{case}-rank{r}.pt") for r in range(4)]
    init = torch.load(two_groups / f"{case}-init.pt")
    for key, full in init.items():
        if "embedding_bags" not in key:
            continue
        shape = tuple(full.shape)
        group0 = assemble([ranks[r]["shards"].get(key, []) for r in (0, 2)], shape)
        group1 = assemble([ranks[r]["shards"].get(key, []) for r in (1, 3)], shape)
        assert not torch.isnan(group0).any() and not torch.isnan(group1).any(), key
        torch.testing.assert_close(group0, group1, atol=1e-6, rtol=0, msg=key)


@pytest.mark.dist
@pytest.mark.parametrize("case", list(WARM_CASES))
def test_warm_accumulators_train_as_k1(case: str, two_groups: Path) -> None:
    """The bug a resume across K showed (step-8 metrics off by ~1e-2): K = 2 summed the
    groups' mean gradients. From a nonzero accumulator K = 1 and K = 2 match the
    reference, whose table gradient is the global batch's mean."""
    init = torch.load(two_groups / "warm-init.pt")
    ref_losses, ref_rows = _warm_reference(init)
    ranks = [torch.load(two_groups / f"{case}-rank{r}.pt") for r in range(4)]
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), atol=eq.LOSS_ATOL, rtol=0
    )
    groups = [[0, 1, 2, 3]] if WARM_CASES[case] == 1 else [[0, 2], [1, 3]]
    for key, ref in ref_rows.items():
        assert (ref - init[key]).abs().max() > 1e-2, f"{key}: reference rows hardly moved"
        for members in groups:
            full = assemble([ranks[r]["shards"][key] for r in members], tuple(ref.shape))
            torch.testing.assert_close(full, ref, atol=eq.ROW_ATOL, rtol=0, msg=key)


def test_parse_and_layout() -> None:
    assert parse_replicas(2, 4) == 2 and parse_replicas("auto", 4) is None
    assert group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(ValueError, match="positive integer or auto"):
            parse_replicas(bad)
    with pytest.raises(ValueError, match="must divide the world size 4"):
        parse_replicas(3, 4)
    assert replica_candidates(1024, 8) == [1, 2, 4, 8]
    assert replica_candidates(4, 8) == [1, 2, 4]


def test_world_estimate_from_one_group() -> None:
    def rank(r: int, shards: int, cost: float) -> RankEstimate:
        return RankEstimate(r, shards, 10 * 2**30, 0, 80 * 2**30, 0, 68 * 2**30, 0, cost, 0, 0, 0)

    ranks = [rank(0, 1, 2.0), rank(1, 0, 0.0)]
    est = estimate_replicas([], ranks, replicas=4, world_size=8, sync_bw_bytes_per_ms=1e6)
    assert est.ranks_with_tables == 4 and est.share_with_tables == 0.5
    assert est.peak_cost_ms == est.peak_total_ms == 2.0 and est.fits
    assert sync_ms(10**6, 4, 1e6) == pytest.approx(1.5) and sync_ms(10**6, 1, 1e6) == 0
    assert pick_replicas([est]) is est


def test_plan_cli_auto_picks_k_and_reports_the_table(compose_cfg, tmp_path: Path) -> None:
    cfg = to_config(
        compose_cfg(
            ["topology.world_size=8", "topology.local_world_size=4", "sharding.replicas=auto"]
        )
    )
    result = plan_cluster(cfg, run_dir=tmp_path)
    assert [e.replicas for e in result.replica_estimates] == [1, 2, 4]
    assert result.replicas == pick_replicas(result.replica_estimates).replicas
    assert "<- chosen" in result.report and (tmp_path / "plan.json").exists()
    assert [e.group_size for e in result.replica_estimates] == [8, 4, 2]


def test_training_refuses_auto_and_k_not_dividing(compose_cfg, tmp_path: Path) -> None:
    from trainer.train import train  # a world of one, in this process

    with pytest.raises(ConfigError, match="must divide the world size 1"):
        train(to_config(compose_cfg(["trainer=smoke", "sharding.replicas=2"])), run_dir=tmp_path)


# Resume across K: the same global batch (512) on every run; 4 ranks x 128.
@pytest.fixture(scope="module")
def saved_k2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("k2")
    proc = torchrun(
        *SAVED, "sharding=row_wise", "sharding.replicas=2", "trainer.batch_size=128",
        run_dir=run_dir, nproc=4,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # 4-rank torchrun runs, ~100 s each on 2 loaded cores; make test has
@pytest.mark.dist  # test_warm_accumulators_train_as_k1, which catches the same bug
def test_k2_checkpoint_resumes_with_k1(saved_k2: Path, tmp_path: Path) -> None:
    proc = torchrun(
        *SAVED, "sharding=table_wise", "trainer.batch_size=256",
        f"trainer.resume={saved_k2}/checkpoints/step_4", run_dir=tmp_path, nproc=2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(saved_k2, tmp_path, "K=2 -> 2 ranks K=1 table_wise")


@pytest.mark.slow  # 4-rank torchrun runs, ~100 s each on 2 loaded cores; make test has
@pytest.mark.dist  # test_warm_accumulators_train_as_k1, which catches the same bug
def test_k1_checkpoint_resumes_with_k2(tmp_path: Path) -> None:
    saved = tmp_path / "k1"
    proc = torchrun(*SAVED, "sharding=table_wise", run_dir=saved, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "k2"
    proc = torchrun(
        *SAVED, "sharding=row_wise", "sharding.replicas=2", "trainer.batch_size=128",
        f"trainer.resume={saved}/checkpoints/step_4", run_dir=resumed, nproc=4,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(saved, resumed, "2 ranks K=1 -> 4 ranks K=2 row_wise")
