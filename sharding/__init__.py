"""Where the embedding tables live: process groups, sharders, plans, DMP wrapping.

The flow is plan-then-apply, as in torchrec::

    env = init_distributed()
    sharders = embedding_sharders()
    topology = make_topology(world_size=env.world_size, compute_device=env.device.type)
    plan = plan_sharding(model, strategy="row_wise", topology=topology, sharders=sharders,
                         pg=env.pg, batch_size=1024, table_names=names)
    print(format_plan(plan))
    model = shard_model(model, plan=plan, env=env, sharders=sharders)

Nothing here imports ``trainer``; functions take plain arguments. The plan
for a cluster you do not have is ``python -m trainer.plan`` (the trainer
composes the config and calls the same planning function it trains with).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sharding.dist import DistEnv, destroy_distributed, init_distributed
    from sharding.dmp import shard_model
    from sharding.planner import STRATEGIES, make_topology, plan_sharding
    from sharding.report import format_plan, plan_to_dict, save_plan
    from sharding.sharders import embedding_sharders

# Imported on first use (PEP 562): ``sharding.quiet`` or ``sharding.collectives``
# alone does not pull in torchrec, so a command line mistake fails in a second.
_EXPORTS = {
    "DistEnv": "sharding.dist",
    "destroy_distributed": "sharding.dist",
    "init_distributed": "sharding.dist",
    "shard_model": "sharding.dmp",
    "STRATEGIES": "sharding.strategies",
    "make_topology": "sharding.planner",
    "plan_sharding": "sharding.planner",
    "format_plan": "sharding.report",
    "plan_to_dict": "sharding.report",
    "save_plan": "sharding.report",
    "embedding_sharders": "sharding.sharders",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sharding' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = [
    "STRATEGIES",
    "DistEnv",
    "destroy_distributed",
    "embedding_sharders",
    "format_plan",
    "init_distributed",
    "make_topology",
    "plan_sharding",
    "plan_to_dict",
    "save_plan",
    "shard_model",
]
