"""Shared test fixtures: composing the real conf/ with Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REPO = CONF_DIR.parent


@pytest.fixture
def compose_cfg():
    """``compose_cfg(["model=dlrm_dcnv2"]) -> DictConfig`` from the repo's conf/."""
    register_configs()
    register_resolvers()

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _slurm_tier(request: pytest.FixtureRequest) -> None:
    """``slurm`` tests skip without sbatch or a live node, and fail so under CI=true."""
    if request.node.get_closest_marker("slurm"):
        from tests.slurm_util import require_slurm

        require_slurm()
