"""One output directory per run, agreed by every rank.

Hydra names the run directory on each rank independently, from the clock, so
two torchrun ranks can straddle a second and write to different places. The
``shardrec_run_name`` resolver names a distributed run after its launch
instead (torchrun's run id, or the SLURM job), and :func:`agree_on_run_dir`
checks every rank got the same answer before anything is written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from trainer.config.schema import ConfigError


def run_name() -> str:
    """``HH-MM-SS`` for one process; the launch's id for torchrun or SLURM."""
    if "SLURM_JOB_ID" in os.environ:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{step}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return time.strftime("%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("shardrec_run_name"):
        OmegaConf.register_new_resolver("shardrec_run_name", run_name)


def agree_on_run_dir(run_dir: Path) -> Path:
    """Raises ConfigError on every rank if ranks resolved different run directories
    (only possible without a launch id); a collective: every rank calls it."""
    from sharding.collectives import all_gather_object  # torch.distributed: not at compose

    dirs = all_gather_object(str(run_dir.resolve()))
    if len(set(dirs)) != 1:
        raise ConfigError(
            f"ranks resolved different output directories {sorted(set(dirs))}; "
            "pass hydra.run.dir=<dir> explicitly (or launch with torchrun --standalone "
            "or --rdzv-id so the run has an id)"
        )
    return run_dir
