"""``sharding.replica_layout=hosts`` as the trainer applies it, synced every step.

4 gloo ranks as 2 hosts of 2 (``LOCAL_WORLD_SIZE=2``), ``sharding.replicas=2``
with the ``hosts`` layout: group 0 is host 0 (ranks 0, 1), group 1 host 1
(ranks 2, 3), each group planned as a world of one host of 2 ranks (L, not
L / K, ranks per host) and the replica sync crossing hosts (ranks 0-2, 1-3).
``build()`` reads the layout and ``replica_sync_every=1`` from the config; the
tiny DLRM of tests/test_sharding_equivalence.py must match its unsharded
reference (losses, every table row) at the same tolerances, with both groups'
copies of every table equal. ``table_row_wise`` also exercises torchrec's 2-D
intra-host groups, which follow the layout (``use_inter_host_allreduce``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tests.test_sharding_equivalence as eq
from sharding import destroy_distributed, init_distributed
from sharding.replicas import group_ranks
from sharding.state import assemble
from tests.distributed import run_ranks

CASES = ["hosts_row_wise", "hosts_table_row_wise"]
GROUPS = group_ranks(4, 2, "hosts")  # [[0, 1], [2, 3]]


def _case_config(case: str):  # noqa: ANN202 - tests' Config
    cfg = eq.tiny_config(case.removeprefix("hosts_"))
    cfg.sharding.replicas = 2
    cfg.sharding.replica_layout = "hosts"
    cfg.sharding.replica_sync_every = 1
    return cfg


def _worker(rank: int, cases: list[str], out_dir: str) -> None:
    eq._case_config = _case_config  # this process's equivalence helpers train our cases
    env = init_distributed(device="cpu")
    try:
        for case in cases:
            eq._train_case(rank, env, case, Path(out_dir))
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replica_layout")
    for case in CASES:
        torch.manual_seed(0)
        init = eq.unsharded_model(_case_config(case), device=torch.device("cpu")).state_dict()
        torch.save(init, out / f"{case}-init.pt")
    run_ranks(_worker, CASES, str(out), world_size=4, local_world_size=2)
    return out


def test_hosts_groups_are_whole_hosts() -> None:
    assert GROUPS == [[0, 1], [2, 3]]


@pytest.mark.slow  # one 4-rank run of both cases: about 70 s on the loaded 2 cores
@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_hosts_layout_matches_unsharded(
    case: str, two_hosts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eq, "_case_config", _case_config)
    plan = eq._check_equivalence(two_hosts, case, world_size=4)
    print(f"{case}: loss diff {plan['_max_loss_diff']:.1e}, row diff {plan['_max_row_diff']:.1e}")
    strategy = case.removeprefix("hosts_")
    assert {v[0] for k, v in plan.items() if k.startswith("t_")} == {strategy}
    # Plan ranks are group ranks: one host of 2 ranks.
    assert {r for k, v in plan.items() if k.startswith("t_") for r in v[1]} <= {0, 1}
    ranks = [torch.load(two_hosts / f"{case}-rank{r}.pt") for r in range(4)]
    init = torch.load(two_hosts / f"{case}-init.pt")
    moved = 0.0
    for key, full in init.items():
        if "embedding_bags" not in key:
            continue
        shape = tuple(full.shape)
        copies = [assemble([ranks[r]["shards"].get(key, []) for r in g], shape) for g in GROUPS]
        for copy in copies:  # each host holds the whole table
            assert not torch.isnan(copy).any(), key
        torch.testing.assert_close(copies[0], copies[1], atol=1e-6, rtol=0, msg=key)
        moved = max(moved, float((copies[0] - full).abs().max()))
    assert moved > 1e-3  # the rows trained
