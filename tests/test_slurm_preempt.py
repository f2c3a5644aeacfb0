"""trainer/preempt.py without SLURM: signals set a flag, every rank agrees on it.

The end-to-end path (a real job stopped, requeued and resumed) is in test_slurm.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.preempt import PREEMPTED_EXIT_CODE, Preempted, Preemption


def test_signal_sets_flag_checked_every_k_steps() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(device=torch.device("cpu"), world_size=1, check_every_steps=5) as p:
        assert not p.should_stop(5)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal is ignored, not fatal
        assert p.requested == signal.SIGUSR1
        assert not p.should_stop(7)  # only every 5th step
        assert p.should_stop(10)
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers put back


def test_preempted_exits_with_75() -> None:
    with pytest.raises(SystemExit) as info:
        raise Preempted(step=3)
    assert info.value.code == PREEMPTED_EXIT_CODE == 75


def _agree(rank: int, store_path: str, results: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    preemption = Preemption(device=torch.device("cpu"), world_size=2, check_every_steps=1)
    with preemption:
        if rank == 1:  # only one rank is signalled
            os.kill(os.getpid(), signal.SIGUSR1)
        decisions = [preemption.should_stop(step) for step in (1, 2)]
    Path(results, f"rank{rank}").write_text(repr(decisions))
    dist.destroy_process_group()


@pytest.mark.dist
def test_every_rank_stops_when_one_is_signalled(tmp_path: Path) -> None:
    mp.start_processes(
        _agree,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    assert (tmp_path / "rank0").read_text() == "[True, True]"
    assert (tmp_path / "rank1").read_text() == "[True, True]"
