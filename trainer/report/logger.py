"""Metrics sinks: ``metrics.jsonl`` in the run directory, and wandb when asked.

Only rank 0 writes; on other ranks every method is a no-op (and no wandb run is
created), so the loop calls the logger unconditionally. With ``logger=wandb``
the run carries the resolved config, every logged record, the summary, and at
``finish()`` the sharding plan (``plan.json``) as a ``wandb.Table`` and every
``*.png`` of the run directory as an image. ``logger.mode=auto`` (the default)
runs online when ``WANDB_API_KEY`` is set and offline otherwise (files under
``run_dir/wandb/``, upload later with ``wandb sync run_dir/wandb/offline-run-*``).
Runs of one Hydra sweep share a wandb ``group`` (the sweep directory) and are
named after their overrides (``hydra.job.override_dirname``).

Example::

    logger = make_logger(LoggerConfig(name="wandb"), run_dir=run_dir, rank=rank,
                         config={"lr": 0.01}, group="lr-study", name="lr=0.01")
    try:
        logger.log({"train_loss": 0.52}, step=100)   # {"step": 100, "train_loss": 0.52}
        logger.log({"auc": 0.74, "ne": 0.88}, step=100)
        logger.summary({"best_auc": 0.74})
    finally:
        logger.finish()
"""

import json
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

METRICS_FILE = "metrics.jsonl"
LOGGER_NAMES = ("none", "wandb")
# auto: online when WANDB_API_KEY is set, else offline.
WANDB_MODES = ("auto", "offline", "online", "disabled")
PLAN_FILE = "plan.json"
# wandb caps group names at 128 characters.
_MAX_GROUP_CHARS = 128


@dataclass
class LoggerConfig:
    """Schema of the Hydra group ``logger`` (conf/logger/*.yaml)."""

    name: str = "none"  # "none" | "wandb"
    project: str = "shardrec"
    # auto: online with WANDB_API_KEY, else offline | offline (no network) | online | disabled
    mode: str = "auto"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


class MetricsLogger:
    """Appends metric records to ``metrics.jsonl`` and mirrors them to a wandb run.

    Built by ``make_logger``; ``path=None`` is a non-zero rank and writes nothing.
    """

    def __init__(self, *, path: Path | None, wandb_run: Any | None = None) -> None:
        self.path = path
        self._wandb_run = wandb_run
        self.run_dir = path.parent if path is not None else None

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        """Writes ``{"step": step, **metrics}`` as one JSON line (and to wandb)."""
        if self.path is None:
            return
        # Open per record: each line is on disk at once, a crash loses nothing,
        # and there is no handle to leak; records are rare next to train steps.
        # default=float takes 0-d tensors and numpy scalars as well.
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def summary(self, summary: dict) -> None:
        """Sets the wandb run summary (final or best values), if wandb is on."""
        if self._wandb_run is not None:
            self._wandb_run.summary.update(summary)

    def finish(self) -> None:
        """Adds the plan and plots to the wandb run and closes it; safe to call twice."""
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            try:
                _log_run_files(run, self.run_dir)
            finally:
                run.finish()
            import wandb

            # Stops the wandb-core helper process now rather than at interpreter
            # exit; the next wandb.init (a multirun job) starts a fresh one.
            wandb.teardown()


def make_logger(
    cfg: LoggerConfig,
    *,
    run_dir: Path,
    rank: int,
    config: dict,
    group: str | None = None,
    name: str | None = None,
) -> MetricsLogger:
    """Builds the logger for this rank; ``config`` is the resolved run config for wandb.

    ``group`` and ``name`` label the wandb run; when both are None they come from
    the Hydra job if there is one (:func:`hydra_run_labels`).
    """
    if cfg.name not in LOGGER_NAMES:
        raise ValueError(f"logger.name={cfg.name!r} is unknown; use one of {list(LOGGER_NAMES)}")
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.mode!r} is unknown; use one of {list(WANDB_MODES)}")
    if rank != 0:
        return MetricsLogger(path=None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    if cfg.name == "none":
        return MetricsLogger(path=path)
    if group is None and name is None:
        group, name = hydra_run_labels()
    run = _init_wandb(cfg, run_dir=run_dir, config=config, group=group, name=name)
    return MetricsLogger(path=path, wandb_run=run)


def hydra_run_labels() -> tuple[str | None, str | None]:
    """``(group, name)`` for the wandb run of the current Hydra job.

    In a multirun (local or SLURM launcher) the group is the sweep directory and
    the name the job's overrides, e.g. ``optim.embedding_lr=0.02,trainer.batch_size=512``;
    a single run has no group and is named after its overrides (or its directory).
    Outside Hydra (tests, library use): ``(None, None)``, wandb picks a name.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or Path(hydra_cfg.runtime.output_dir).name
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, name
    return str(hydra_cfg.sweep.dir)[-_MAX_GROUP_CHARS:], name


def wandb_mode(mode: str) -> str:
    """The wandb mode ``logger.mode`` stands for (``auto``: online iff WANDB_API_KEY is set)."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def _init_wandb(
    cfg: LoggerConfig, *, run_dir: Path, config: dict, group: str | None, name: str | None
) -> Any:
    mode = wandb_mode(cfg.mode)
    # Without credentials an online wandb.init prompts on a terminal (a torchrun
    # job then waits forever) or fails deep inside wandb; fail here instead.
    if mode == "online" and not _has_wandb_credentials():
        raise ValueError(
            "logger.mode=online needs wandb credentials: set WANDB_API_KEY (or run "
            "`wandb login` once), or use logger.mode=offline (auto without a key) and upload "
            "later with `wandb sync <run_dir>/wandb/offline-run-*`"
        )
    # wandb is heavy and optional: import it only when a run asks for it.
    import wandb

    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=mode,
        group=group,
        name=name,
        tags=list(cfg.tags),
        dir=str(run_dir),
        config=config,
        # Silent: no banner, no sync hints between the trainer's progress lines.
        settings=wandb.Settings(silent=True),
    )


def _has_wandb_credentials() -> bool:
    """Looks where wandb looks: env vars, then the netrc entry for the server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    netrc_path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        creds = netrc.netrc(netrc_path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return creds is not None and bool(creds[2])


def _log_run_files(run: Any, run_dir: Path | None) -> None:
    """The sharding plan as a table and the run's plots as images, logged once at the end."""
    import wandb

    if run_dir is None:
        return
    media: dict[str, Any] = {}
    plan_path = run_dir / PLAN_FILE
    if plan_path.exists():
        columns, rows = plan_rows(json.loads(plan_path.read_text()))
        media["sharding_plan"] = wandb.Table(columns=columns, data=rows)
    for png in sorted(run_dir.glob("*.png")):
        media[f"plots/{png.stem}"] = wandb.Image(str(png))
    if media:
        run.log(media)


def plan_rows(saved_plan: dict) -> tuple[list[str], list[list[Any]]]:
    """``plan.json`` (``sharding.save_plan``) as table columns and one row per table."""
    columns = ["module", "table", "sharding_type", "compute_kernel", "ranks", "shards"]
    rows = []
    for module, tables in saved_plan.get("plan", {}).items():
        for table, p in tables.items():
            shards = " ".join(
                f"r{sh['rank']}:{sh['sizes'][0]}x{sh['sizes'][1]}@{sh['offsets'][0]},{sh['offsets'][1]}"
                for sh in p.get("shards") or []
            )
            ranks = ",".join(map(str, p.get("ranks") or []))
            rows.append([module, table, p["sharding_type"], p["compute_kernel"], ranks, shards])
    return columns, rows
