"""Factorized tables on the hierarchical strategies: 4 gloo ranks as 2 hosts x 2.

One model holds every form, each on its own tables (``FORMS["each"]`` in
tests/test_factorized.py: a low-rank table, a quotient-remainder pair projected
back, a full table and a mixed-dims one); one 4-process group trains it 5 steps
with ``sharding=table_row_wise`` and then ``sharding=grid`` (``LOCAL_WORLD_SIZE=2``:
rows split within a host; grid also splits the 8-wide stored tables into two
4-wide column blocks, one per host), and each must match one process training the
same model from the same weights on the same global batches (losses within 1e-5,
every stored row within 1e-4; the reference of tests/test_factorized.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sharding.planner import sharding_type
from tests.test_factorized import check_sharded, run_cases

STRATEGIES = ["table_row_wise", "grid"]
CASES = [(f"each-{s}", "each", s) for s in STRATEGIES]
# Host (ranks 0-1 or 2-3) and column blocks per stored table: table_row_wise keeps
# each table on one host; grid puts an 8-wide table's two 4-wide blocks on both.
WIDE_STORED = {"t_cat_1_q", "t_cat_1_r", "t_cat_2"}


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_cases(tmp_path_factory.mktemp("fzh"), CASES, world_size=4, local_world_size=2)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_form_on_two_hosts_matches_unsharded(strategy: str, two_hosts: Path) -> None:
    plan = check_sharded(two_hosts, f"each-{strategy}", "each", strategy, world_size=4)
    assert set(plan) == {"t_cat_0", "t_cat_1_q", "t_cat_1_r", "t_cat_2", "t_cat_3"}
    assert {v[0] for v in plan.values()} == {sharding_type(strategy)}, plan
    for table, (_, ranks) in plan.items():
        hosts = {r // 2 for r in ranks}
        want = 2 if strategy == "grid" and table in WIDE_STORED else 1
        assert len(hosts) == want and len(set(ranks)) == 2 * want, (table, ranks)
