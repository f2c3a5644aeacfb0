"""Starting real ranks for tests: N fresh processes on gloo over 127.0.0.1.

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set before it runs, so the code
under test initialises its process group exactly as under torchrun.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from tests.processes import run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., None],
    world_size: int,
    local_world_size: int,
    port: int,
    args: tuple[Any, ...],
    environ: dict[str, str],
) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world_size),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    fn(rank, *args)


# What every rank imports anyway, imported once per test worker by the fork server
# rather than once per rank: a spawned rank spends ~9 s of CPU importing torch and
# torchrec before it runs.
FORKSERVER_PRELOAD = [
    "torch",
    "torchrec.distributed.model_parallel",
    "torchrec.distributed.planner",
    "torchmetrics",
    "trainer.config.schema",
    "trainer.train",  # torchmetrics, the export path (fork_trainer's ranks)
    "trainer.__main__",
    "tests.distributed",
]


def run_ranks(
    fn: Callable[..., None],
    *args: Any,
    world_size: int = 2,
    local_world_size: int | None = None,
    timeout_s: float = 900,
) -> None:
    """Runs ``fn(rank, *args)`` in ``world_size`` processes; raises if any rank fails,
    or kills them all and raises ``TimeoutError`` if they have not ended in ``timeout_s``
    (a hung collective fails the test instead of the CI run).

    The ranks are forked from a fork server that has imported the heavy modules and
    done nothing else (no thread pool, no process group): fresh processes as under
    spawn, minus the import time. The caller's environment is passed along.
    """
    mp.set_forkserver_preload(FORKSERVER_PRELOAD)
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, local_world_size or world_size, free_port(), args, dict(os.environ)),
        nprocs=world_size,
        start_method="forkserver",
        join=False,
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks of {fn.__name__} still ran after {timeout_s} s")


def torchrun_trainer(
    *overrides: str, run_dir: Path, nproc: int = 2, timeout_s: int = 400
) -> subprocess.CompletedProcess:
    """``torchrun --standalone -m trainer`` with overrides; asserts it exited 0."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = run(
        [
            str(torchrun),
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "trainer",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=Path(__file__).resolve().parents[1],
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _trainer_main(rank: int, argv: list[str]) -> None:
    from trainer.__main__ import main

    main(argv)


def fork_trainer(*overrides: str, run_dir: Path, nproc: int = 2, timeout_s: float = 400) -> None:
    """``python -m trainer`` on ``nproc`` ranks forked by :func:`run_ranks`: the same
    trainer as under ``torchrun`` (the same environment per rank), without the agent and
    without each rank importing torch and torchrec again (~10 s of CPU per rank here).
    For the tests whose subject is not the launcher; raises if a rank fails or if the
    run outlasts ``timeout_s`` (``torchrun_trainer``'s limit)."""
    run_ranks(
        _trainer_main,
        [*overrides, f"hydra.run.dir={run_dir}"],
        world_size=nproc,
        timeout_s=timeout_s,
    )
