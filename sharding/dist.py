"""The process group and device, from what torchrun or SLURM put in the environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE and MASTER_ADDR /
MASTER_PORT; ``srun python -m trainer`` sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID instead, and MASTER_ADDR / MASTER_PORT come from the job's first
host and id when the launcher did not export them (submitit does not). A
plain ``python -m trainer`` is a world of one, still with a real process group,
because DistributedModelParallel needs one.

Example::

    env = init_distributed()            # gloo on CPU, nccl on CUDA
    ...
    destroy_distributed()
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    pg: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def pick_device(device: str, local_rank: int) -> torch.device:
    """``auto`` is CUDA when available; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "sharding.device=cuda but no CUDA device is visible; "
                "use sharding.device=cpu (or auto)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rendezvous_from_slurm() -> None:
    """MASTER_ADDR / MASTER_PORT for ``srun python -m trainer`` (and submitit) tasks.

    The first host of the job's nodelist, and a port from the job id, the same on
    every task; scripts/slurm/train.sbatch exports the same values itself.
    """
    nodelist, job_id = os.environ.get("SLURM_JOB_NODELIST"), os.environ.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        return
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()
    os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job_id) % 20000))


def _attempt_store(*, world_size: int, timeout: timedelta) -> dist.Store:
    """The torchrun agent's store, with keys of this attempt only.

    torchrun's agent keeps one TCPStore for every restart of its workers, and
    ``init_process_group`` writes each rank's gloo address under the same keys
    every time: a restarted group can read a dead rank's address and fail to
    connect ("Connection refused") or hang. A prefix per restart and world
    size (an elastic re-form changes it) keeps each attempt's keys apart.
    """
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"shardrec/attempt_{attempt}/world_{world_size}", client)


def init_distributed(
    *,
    backend: str | None = None,
    device: str = "auto",
    timeout_s: float = 600.0,
    emulate_local_world_size: int | None = None,
) -> DistEnv:
    """Initialises (or reuses) the default process group and picks this rank's device.

    ``emulate_local_world_size`` pretends hosts hold that many processes (CPU only):
    torchrec groups ranks into hosts by LOCAL_WORLD_SIZE, so this is how the
    hierarchical strategies run as 2 hosts x 2 processes on one machine.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world_size)
    dev = pick_device(device, local_rank)
    if emulate_local_world_size and emulate_local_world_size != local_world_size:
        if dev.type != "cpu":
            raise ValueError(
                f"topology.local_world_size={emulate_local_world_size} differs from the "
                f"{local_world_size} processes per host launched; emulating hosts is for "
                f"CPU runs only (drop the override on GPUs)"
            )
        local_world_size = emulate_local_world_size
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if world_size > 1 and "MASTER_ADDR" not in os.environ:
            _rendezvous_from_slurm()
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # A world of one needs no rendezvous: an in-memory store will do.
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _attempt_store(world_size=world_size, timeout=timeout)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=dev,
        backend=backend,
        pg=dist.group.WORLD,  # type: ignore[arg-type]
    )


def destroy_distributed() -> None:
    """Tears the default process group down; safe to call when none exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_from_env() -> int:
    """The world size the launcher announced, before any process group exists."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def local_world_size_from_env() -> int:
    """Processes per host the launcher announced (the world size if it said nothing)."""
    return _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world_size_from_env())
