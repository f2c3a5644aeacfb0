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

from sharding.dist import DistEnv, destroy_distributed, init_distributed
from sharding.dmp import shard_model
from sharding.planner import STRATEGIES, make_topology, plan_sharding
from sharding.report import format_plan, plan_to_dict, save_plan
from sharding.sharders import embedding_sharders

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
