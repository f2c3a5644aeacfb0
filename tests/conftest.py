"""Shared test fixtures (composing the real conf/ with Hydra's compose API) and the
grouping of tests over ``make test``'s pytest-xdist workers."""

from __future__ import annotations

import os
from pathlib import Path

# MKL's GEMMs on AVX-512 CPUs round differently with the memory alignment of their
# operands, so a resumed run's dense gradients can differ from the run that never
# stopped in the last bit. The bit-for-bit resume tests run MKL in its strict
# reproducible mode (docs/checkpoints.md); set before any GEMM, inherited by every
# process a test starts. A value already set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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


# Tests that time real processes against each other (a rank killed at a step, an
# elastic join, a SLURM job requeued, a follow job polling, a reader polling a
# publisher): one worker runs them one after another, so two of them never share
# the 2 cores. Every other test module stays whole on one worker (its module
# fixtures run once) and the modules are spread over the workers.
SERIAL_MODULES = frozenset(
    {
        "test_elastic",
        "test_faults_blocked",
        "test_faults_checkpoint",
        "test_faults_kill",
        "test_follow",
        "test_publish",
        "test_slurm",
        "test_slurm_preempt",
    }
)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole modules to a worker; all of SERIAL_MODULES to the same one."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "serial" if Path(module).stem in SERIAL_MODULES else module

    return ModuleScheduling(config, log)


POSTGRES_URL = "postgresql://shardrec:shardrec@localhost:5432/shardrec_test"  # .ci/run's


@pytest.fixture
def postgres_url() -> str:
    """A PostgreSQL server for a shared optuna study (``SHARDREC_TEST_POSTGRES``, default
    .ci/run's role and database): skips without one, and fails so under CI=true."""
    import os

    url = os.environ.get("SHARDREC_TEST_POSTGRES", POSTGRES_URL)
    try:
        import psycopg2

        psycopg2.connect(url, connect_timeout=5).close()
    except Exception as err:  # the driver missing, or no server answering
        reason = f"no PostgreSQL server at {url} ({' '.join(str(err).split())})"
        hint = "start one as .ci/run does (apt-get install postgresql; pg_ctlcluster)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {reason}; {hint}", pytrace=False)
        pytest.skip(f"{reason}; {hint}")
    return url
