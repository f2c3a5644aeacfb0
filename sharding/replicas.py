"""2D sparse parallelism on any backend: K replica groups, each sharding the tables.

The world of W ranks is cut into K groups of G = W / K ranks, laid out as
torchrec's ``DMPCollection`` lays them out. ``interleaved``
(``use_inter_host_allreduce=False``, the default): group ``g`` holds global
ranks ``g, g + K, g + 2K, ...``, so the K copies of a shard sit on neighbouring
ranks of one host and the replica sync stays inside the host. ``hosts``
(``use_inter_host_allreduce=True``): group ``g`` holds ranks ``g G .. (g + 1) G
- 1``, whole hosts, and the sync crosses hosts. Every group shards the tables
by the same plan, made for G ranks (plan ranks are group ranks), with a
DistributedModelParallel over the group's process group; the dense part stays
one DDP over the whole world.

torchrec's ``DMPCollection`` refuses anything but CUDA/MTIA, and its ``sync()``
averages weights and optimizer state, which is not the optimizer the other
strategies run. :class:`ReplicaSync` keeps the replicas on exactly the K = 1
trajectory instead: before each training forward it copies this rank's shard
rows and their row-wise Adagrad accumulators; after the fused update it
recovers the group's gradient of every row from the update FBGEMM applied
(``g = (w0 - w1) (sqrt(m1) + eps) / lr``), averages it over the replica group
(one all-reduce of this rank's rows per step) and re-applies row-wise Adagrad
to the copy with the averaged gradient. Averaged, not summed: torchrec divides
the tables' backward collectives by the sharding group's size, so a group's
gradient is the mean over its own samples and the K groups' mean is the global
batch's mean, the gradient of a K = 1 run of any world size (a checkpoint then
resumes with another K). The price: one copy of the rank's rows and
accumulators, and an all-reduce of its rows, every step.

``every=N > 1`` (``sharding.replica_sync_every``) syncs every N steps instead:
each replica trains on its own group's gradients in between, and the sync
averages the replicas' changes since the last sync, ``w = w_s + mean_k (w_k -
w_s)`` (the replicas' mean, as torchrec's ``DMPCollection.sync()``), likewise
for the accumulators (one all-reduce of rows + accumulators). Summing instead
would move a row both replicas touched about K times its K = 1 step (each
replica's row-wise Adagrad normalises its own gradient). This is not the K = 1
trajectory: between syncs a replica does not see the others' updates (the
divergence is measured in docs/scaling.md). Steps after the last sync stay
unsynced until :meth:`ReplicaSync.flush` (the trainer flushes before every
checkpoint).

Example::

    groups = ReplicaGroups.create(world_size=4, replicas=2, backend="gloo")
    dmp = shard_model_in_group(model, plan=plan, env=env, groups=groups, sharders=sharders)
    sync = ReplicaSync(dmp, groups=groups, eps=1e-8)
    optimizer = ReplicaSyncOptimizer(optimizer, sync)   # step() also syncs
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.remote_device import _remote_device
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv2D, ShardingPlan
from torchrec.optim.keyed import KeyedOptimizer, OptimizerWrapper

from sharding.collectives import all_sum, broadcast_tensor
from sharding.dist import DistEnv
from sharding.dmp import fix_dense_bucket_layout
from sharding.tbe_cpu import use_compiled_backward


def parse_replicas(value: Any, world_size: int | None = None) -> int | None:
    """``sharding.replicas`` as a count; None for ``auto``. ValueError names the fix."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        replicas = int(value)
    except (TypeError, ValueError):
        replicas = 0
    if replicas < 1 or str(value).strip() != str(replicas):
        raise ValueError(f"sharding.replicas={value!r}: use a positive integer or auto")
    if world_size is not None and world_size % replicas:
        raise ValueError(
            f"sharding.replicas={replicas} must divide the world size {world_size}: "
            f"every replica group has world_size/replicas ranks"
        )
    return replicas


def training_replicas(value: Any, world_size: int) -> int:
    """The K a running job trains with; ``auto`` is for planning only."""
    replicas = parse_replicas(value, world_size)
    if replicas is None:
        raise ValueError(
            "sharding.replicas=auto picks K when planning (python -m trainer.plan "
            "sharding.replicas=auto prints the table of K); train with the K it chose, "
            "e.g. sharding.replicas=2"
        )
    return replicas


def group_ranks(world_size: int, replicas: int, layout: str = "interleaved") -> list[list[int]]:
    """The global ranks of each group: interleaved, group g is ``g, g + K, ...``; hosts,
    group g is ``g G .. (g + 1) G - 1`` (torchrec's two layouts)."""
    if replicas < 1 or world_size % replicas:
        raise ValueError(f"sharding.replicas={replicas} must divide the world size {world_size}")
    if layout == "hosts":
        size = world_size // replicas
        return [list(range(g * size, (g + 1) * size)) for g in range(replicas)]
    if layout != "interleaved":
        raise ValueError(f"sharding.replica_layout={layout!r}: use interleaved or hosts")
    return [list(range(g, world_size, replicas)) for g in range(replicas)]


def global_rank(group_rank: int, group: int, *, replicas: int, group_size: int, layout: str) -> int:
    """Where group ``group``'s rank ``group_rank`` sits in the world."""
    if layout == "hosts":
        return group * group_size + group_rank
    return group_rank * replicas + group


@dataclass(frozen=True)
class ReplicaGroups:
    """This rank's sharding group and replica group, from one 2-D device mesh."""

    replicas: int
    group: int  # which replica group this rank is in
    group_rank: int
    group_size: int
    sharding_pg: dist.ProcessGroup
    replica_pg: dist.ProcessGroup
    mesh: DeviceMesh
    layout: str = "interleaved"

    @classmethod
    def create(
        cls, *, world_size: int, replicas: int, device_type: str, layout: str = "interleaved"
    ) -> ReplicaGroups:
        """Collective: every rank calls it, with the same arguments."""
        rank = dist.get_rank()
        layout_ranks = group_ranks(world_size, replicas, layout)
        group = next(g for g, ranks in enumerate(layout_ranks) if rank in ranks)
        # Rows are sharding groups, columns replicas of one group rank (torchrec's mesh).
        mesh = DeviceMesh(device_type, layout_ranks, mesh_dim_names=("replicate", "shard"))
        return cls(
            replicas=replicas,
            group=group,
            group_rank=layout_ranks[group].index(rank),
            group_size=world_size // replicas,
            sharding_pg=mesh.get_group("shard"),
            replica_pg=mesh.get_group("replicate"),
            mesh=mesh,
            layout=layout,
        )

    def to_global_rank(self, group_rank: int, group: int | None = None) -> int:
        """Global rank of ``group_rank`` in ``group`` (default: this rank's group)."""
        return global_rank(
            group_rank,
            self.group if group is None else group,
            replicas=self.replicas,
            group_size=self.group_size,
            layout=self.layout,
        )

    def sharding_env(self, *, node_group_size: int) -> ShardingEnv2D:
        """torchrec's 2-D env: group rank and size for sharding, the world for DDP.

        ShardedTensor state (``output_dtensor=False``), as the rest of the project
        (checkpoints, ``sharding.state``) reads it.
        """
        env = ShardingEnv2D(
            sharding_pg=self.sharding_pg,
            replica_pg=self.replica_pg,
            global_pg=dist.group.WORLD,  # type: ignore[arg-type]
            device_mesh=self.mesh,
            node_group_size=node_group_size,
            # torchrec's remap_rank and 2-D intra-host groups follow the layout
            use_inter_host_allreduce=self.layout == "hosts",
        )
        env.output_dtensor = False
        return env

    def to_global(self, plan: ShardingPlan, device_type: str) -> ShardingPlan:
        """The group's plan (group ranks) on this group's global ranks, as DMPCollection
        remaps it: group rank i is global rank ``i * K + group`` (interleaved) or
        ``group * G + i`` (hosts)."""
        plan = copy.deepcopy(plan)
        for module_plan in plan.plan.values():
            for ps in module_plan.values():  # type: ignore[union-attr]
                ps.ranks = [self.to_global_rank(r) for r in ps.ranks or []]
                if isinstance(ps.sharding_spec, EnumerableShardingSpec):
                    for shard in ps.sharding_spec.shards:
                        rank = self.to_global_rank(int(shard.placement.rank()))
                        where = device_type if device_type == "cpu" else f"{device_type}:0"
                        shard.placement = _remote_device(f"rank:{rank}/{where}")
        return plan


def shard_model_in_group(
    model: nn.Module,
    *,
    plan: ShardingPlan,
    env: DistEnv,
    groups: ReplicaGroups,
    sharders: list[ModuleSharder[nn.Module]],
    node_group_size: int,
) -> DistributedModelParallel:
    """Shards the tables over this rank's group by ``plan`` (made for the group's ranks);
    the dense part is one DDP over the world."""
    dmp = DistributedModelParallel(
        module=model,
        device=env.device,
        env=groups.sharding_env(node_group_size=node_group_size),
        plan=groups.to_global(plan, env.device.type),
        sharders=sharders,
    )
    fix_dense_bucket_layout(dmp)
    use_compiled_backward(dmp)
    return dmp


def _local(value: Any) -> list[torch.Tensor]:
    if isinstance(value, ShardedTensor):
        return [s.tensor for s in value.local_shards()]
    return [value]


def _shard_pairs(fused: KeyedOptimizer) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """(rows, accumulator, lr) of every local shard the fused row-wise Adagrad updates."""
    lrs = {id(p): float(g["lr"]) for g in fused.param_groups for p in g["params"]}
    for param in fused.params.values():
        states = [v for k, v in fused.state[param].items() if k.endswith("momentum1")]
        if len(states) != 1 or len(fused.state[param]) != 1:
            raise ValueError(
                f"replica sync implements FBGEMM's row-wise Adagrad (one momentum1 per "
                f"table), not state {sorted(fused.state[param])}"
            )
        for rows, acc in zip(_local(param), _local(states[0]), strict=True):
            if acc.numel() != rows.shape[0]:
                raise ValueError(f"accumulator {tuple(acc.shape)} for rows {tuple(rows.shape)}")
            yield rows, acc.view(-1), lrs[id(param)]


def _fused_optimizer(dmp: DistributedModelParallel) -> KeyedOptimizer:
    return dmp.fused_optimizer


class ReplicaSync:
    """Averages each step's table gradients over the replica group, or the replicas'
    changes every ``every`` steps (see the module docstring)."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        *,
        groups: ReplicaGroups,
        eps: float,
        every: int = 1,
    ):
        if every < 1:
            raise ValueError(f"sharding.replica_sync_every={every} must be >= 1")
        self.dmp, self.groups, self.eps, self.every = dmp, groups, eps, every
        self._before: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # every > 1
        self._unsynced_steps = 0
        self.synced_bytes = 0  # per sync, this rank's share of the all-reduce
        self._make_equal()
        dmp.register_forward_pre_hook(self._snapshot)

    @torch.no_grad()
    def _make_equal(self) -> None:
        """Collective: every replica starts from replica group 0's rows and state.

        Each group's DMP initialises its own copy of the tables with its own
        random draws; the sync keeps copies equal only if they start equal. (A
        resume then loads the same checkpoint rows into every copy.)
        """
        if self.groups.replicas == 1:
            return
        src = self.groups.to_global_rank(self.groups.group_rank, 0)  # group 0's member
        for rows, acc, _ in _shard_pairs(_fused_optimizer(self.dmp)):
            broadcast_tensor(rows, src=src, group=self.groups.replica_pg)
            broadcast_tensor(acc, src=src, group=self.groups.replica_pg)

    def _copies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (rows.detach().clone(), acc.detach().clone())
            for rows, acc, _ in _shard_pairs(_fused_optimizer(self.dmp))
        ]

    def _snapshot(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            return
        if self.every == 1:
            self._before = self._copies()
        elif self._anchor is None:  # the rows every replica shares since the last sync
            self._anchor = self._copies()

    @torch.no_grad()
    def sync(self) -> None:
        """After the fused update: the replica group's mean gradient, re-applied
        (every step), or the replicas' averaged changes every ``every`` steps."""
        if self.groups.replicas == 1:
            return
        if self.every > 1:
            self._unsynced_steps += 1
            if self._unsynced_steps >= self.every:
                self.flush()
            return
        if self._before is None:
            return
        shards = list(_shard_pairs(_fused_optimizer(self.dmp)))
        grads = []
        for (rows, acc, lr), (rows0, _acc0) in zip(shards, self._before, strict=True):
            # FBGEMM: m1 = m0 + mean(g^2); w1 = w0 - lr * g / (sqrt(m1) + eps).
            scale = (acc.sqrt() + self.eps) / lr
            grads.append(((rows0 - rows) * scale.unsqueeze(1)).reshape(-1))
        flat = torch.cat(grads) if grads else torch.zeros(0)
        # torchrec divides the backward all-to-all / reduce-scatter by the sharding
        # group's size, so each group's gradient is the mean over its own samples; the
        # mean over the K groups is the global batch's, which K = 1 trains with at any
        # world size. (A sum is K times that: unseen in a run from a zero accumulator,
        # where row-wise Adagrad's update ignores a constant scale, but not once the
        # accumulator came from another K: a resume.)
        all_sum(flat, group=self.groups.replica_pg)
        flat /= self.groups.replicas
        self.synced_bytes = flat.numel() * flat.element_size()
        offset = 0
        for (rows, acc, lr), (rows0, acc0) in zip(shards, self._before, strict=True):
            grad = flat[offset : offset + rows.numel()].view_as(rows)
            offset += rows.numel()
            acc.copy_(acc0 + grad.pow(2).mean(dim=1))
            rows.copy_(rows0 - (lr / (acc.sqrt() + self.eps)).unsqueeze(1) * grad)
        self._before = None

    @torch.no_grad()
    def flush(self) -> None:
        """Collective: averages the replicas' changes since the last sync (every > 1)."""
        if self.groups.replicas == 1 or self._anchor is None:
            return
        shards = list(_shard_pairs(_fused_optimizer(self.dmp)))
        deltas = []
        for (rows, acc, _), (rows0, acc0) in zip(shards, self._anchor, strict=True):
            deltas += [(rows - rows0).reshape(-1), acc - acc0]
        flat = torch.cat(deltas) if deltas else torch.zeros(0)
        all_sum(flat, group=self.groups.replica_pg)
        flat /= self.groups.replicas  # the mean change: every replica ends on the mean
        self.synced_bytes = flat.numel() * flat.element_size()
        offset = 0
        for (rows, acc, _), (rows0, acc0) in zip(shards, self._anchor, strict=True):
            for now, then in ((rows, rows0), (acc, acc0)):
                delta = flat[offset : offset + now.numel()].view_as(now)
                offset += now.numel()
                now.copy_(then + delta)
        self._anchor, self._unsynced_steps = None, 0


class ReplicaSyncOptimizer(OptimizerWrapper):
    """The run's optimizer; ``step()`` steps it, then syncs the replicas' tables."""

    def __init__(self, optimizer: KeyedOptimizer, replica_sync: ReplicaSync) -> None:
        super().__init__(optimizer)
        self.replica_sync = replica_sync

    def step(self, closure: Any = None) -> None:
        self._optimizer.step(closure=closure)
        self.replica_sync.sync()
