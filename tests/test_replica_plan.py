"""The 2D planner's group layouts and replica-sync cost model (sharding/replica_plan.py).

Small worlds planned on ``meta`` (seconds): a group of whole hosts is planned as
the smaller world it is, so its embedding cost does not grow with the world;
the interleaved group sees hosts of L / K ranks; the sync estimate is what
ReplicaSync all-reduces (rows' gradients every step; rows + accumulators' change
every N steps, once per N steps) at the layout's bandwidth.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sharding.replica_plan import (
    group_shape,
    rank_rows_bytes,
    replica_candidates,
    sync_ms,
    synced_bytes,
)
from sharding.replicas import global_rank, group_ranks
from trainer.config.schema import ConfigError, to_config
from trainer.plan.cluster import plan_cluster

GBPS = 1024**3 / 1000  # bytes/ms per GB/s
SMALL = ["data.cardinalities=[5000,3000,2000,800,40]", "data.hotness=[1]"]  # 5 tables: fast


def test_layouts_cut_whole_hosts_or_interleave() -> None:
    assert group_ranks(8, 2, "hosts") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for layout in ("hosts", "interleaved"):
        groups = group_ranks(16, 4, layout)
        for g, ranks in enumerate(groups):
            assert [
                global_rank(i, g, replicas=4, group_size=4, layout=layout) for i in range(4)
            ] == ranks
    assert replica_candidates(1024, 8, "hosts") == [1, 2, 4, 8, 16, 32, 64, 128]
    assert replica_candidates(1024, 8) == [1, 2, 4, 8]
    assert group_shape(1024, 8, 4, "hosts") == (256, 8)
    assert group_shape(1024, 8, 4, "interleaved") == (256, 2)
    with pytest.raises(ValueError, match="whole hosts per group"):
        group_shape(16, 8, 4, "hosts")
    with pytest.raises(ValueError, match="replica_layout='rows'"):
        replica_candidates(16, 8, "rows")


def _plan(compose_cfg, tmp_path: Path, *overrides: str, cache=None):  # noqa: ANN001, ANN202
    cfg = to_config(compose_cfg([*SMALL, "topology.local_world_size=4", *overrides]))
    return plan_cluster(cfg, run_dir=tmp_path, group_cache=cache)


def test_host_groups_cost_what_the_smaller_world_costs(compose_cfg, tmp_path: Path) -> None:
    small = _plan(compose_cfg, tmp_path, "topology.world_size=8").replica_estimates[0]
    big = _plan(
        compose_cfg,
        tmp_path,
        "topology.world_size=16",
        "sharding.replicas=2",
        "sharding.replica_layout=hosts",
    ).replica_estimates[0]
    assert (big.group_size, big.group_local_world_size, big.layout) == (8, 4, "hosts")
    assert big.peak_cost_ms == pytest.approx(small.peak_cost_ms)  # flat: same group, 2x world
    assert big.ranks_with_tables == 2 * small.ranks_with_tables
    interleaved = _plan(
        compose_cfg, tmp_path, "topology.world_size=16", "sharding.replicas=2"
    ).replica_estimates[0]
    assert interleaved.group_local_world_size == 2  # hosts of L / K ranks, spanning all hosts
    # One sync crosses hosts at 12.5 GB/s (hosts) or stays at 600 GB/s (interleaved).
    assert big.sync_once_ms > 0 and interleaved.sync_once_ms > 0
    assert big.sync_once_ms / big.peak_sync_ms == pytest.approx(1.0)


def test_sync_every_n_is_amortised_and_adds_accumulators(compose_cfg, tmp_path: Path) -> None:
    cache: dict = {}
    args = ("topology.world_size=16", "sharding.replicas=4", "sharding.replica_layout=hosts")
    every1 = _plan(compose_cfg, tmp_path, *args, cache=cache)
    every10 = _plan(compose_cfg, tmp_path, *args, "sharding.replica_sync_every=10", cache=cache)
    assert len(cache) == 1  # one group plan (4 ranks, 4 per host) for both
    group = next(iter(cache.values()))
    rows = rank_rows_bytes(group.capture.best_plan, group.planned.topology.world_size)
    once1 = max(sync_ms(synced_bytes(w, a, 1), 4, 12.5 * GBPS) for w, a in rows)
    once10 = max(sync_ms(synced_bytes(w, a, 10), 4, 12.5 * GBPS) for w, a in rows)
    e1, e10 = every1.replica_estimates[0], every10.replica_estimates[0]
    assert e1.sync_once_ms == pytest.approx(once1) and e1.peak_sync_ms == pytest.approx(once1)
    assert e10.sync_once_ms == pytest.approx(once10) and once10 > once1  # + accumulators
    assert e10.peak_sync_ms == pytest.approx(once10 / 10)
    assert e10.peak_cost_ms == e1.peak_cost_ms and e10.peak_total_ms < e1.peak_total_ms
    assert "sync every 10 steps" in every10.report


def test_auto_hosts_tries_every_whole_host_split(compose_cfg, tmp_path: Path) -> None:
    result = _plan(
        compose_cfg,
        tmp_path,
        "topology.world_size=16",
        "sharding.replicas=auto",
        "sharding.replica_layout=hosts",
    )
    assert [e.replicas for e in result.replica_estimates] == [1, 2, 4]
    assert [e.group_size for e in result.replica_estimates] == [16, 8, 4]
    assert "layout hosts" in result.report or result.replicas == 1


def test_bad_replica_settings_are_config_errors(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="whole hosts per group"):
        _plan(
            compose_cfg,
            tmp_path,
            "topology.world_size=8",
            "sharding.replicas=4",
            "sharding.replica_layout=hosts",
        )
    with pytest.raises(ConfigError, match="replica_sync_every=0"):
        _plan(compose_cfg, tmp_path, "topology.world_size=8", "sharding.replica_sync_every=0")
