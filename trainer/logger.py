"""Metrics sinks: ``metrics.jsonl`` in the run directory, and wandb when asked.

Only rank 0 writes; on other ranks every method is a no-op, so the loop calls
the logger unconditionally. wandb runs offline by default (files under
``run_dir/wandb/``, upload later with ``wandb sync run_dir/wandb/offline-run-*``).

Example::

    logger = make_logger(LoggerConfig(name="wandb"), run_dir=run_dir, rank=rank,
                         config={"lr": 0.01})
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
_NAMES = ("none", "wandb")
_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """Schema of the Hydra group ``logger`` (conf/logger/*.yaml)."""

    name: str = "none"  # "none" | "wandb"
    project: str = "shardrec"
    mode: str = "offline"  # wandb mode: offline (no network) | online | disabled
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


class MetricsLogger:
    """Appends metric records to ``metrics.jsonl`` and mirrors them to a wandb run.

    Built by ``make_logger``; ``path=None`` is a non-zero rank and writes nothing.
    """

    def __init__(self, *, path: Path | None, wandb_run: Any | None = None) -> None:
        self.path = path
        self._wandb_run = wandb_run

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
        """Closes the wandb run, flushing offline files; safe to call twice."""
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish()
            import wandb

            # Stops the wandb-core helper process now rather than at interpreter
            # exit; the next wandb.init (a multirun job) starts a fresh one.
            wandb.teardown()


def make_logger(cfg: LoggerConfig, *, run_dir: Path, rank: int, config: dict) -> MetricsLogger:
    """Builds the logger for this rank; ``config`` is the resolved run config for wandb."""
    if cfg.name not in _NAMES:
        raise ValueError(f"logger.name={cfg.name!r} is unknown; use one of {list(_NAMES)}")
    if cfg.mode not in _MODES:
        raise ValueError(f"logger.mode={cfg.mode!r} is unknown; use one of {list(_MODES)}")
    if rank != 0:
        return MetricsLogger(path=None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    if cfg.name == "none":
        return MetricsLogger(path=path)
    return MetricsLogger(path=path, wandb_run=_init_wandb(cfg, run_dir=run_dir, config=config))


def _init_wandb(cfg: LoggerConfig, *, run_dir: Path, config: dict) -> Any:
    # Without credentials an online wandb.init prompts on a terminal (a torchrun
    # job then waits forever) or fails deep inside wandb; fail here instead.
    if cfg.mode == "online" and not _has_wandb_credentials():
        raise ValueError(
            "logger.mode=online needs wandb credentials: set WANDB_API_KEY (or run "
            "`wandb login` once), or keep the default logger.mode=offline and upload "
            "later with `wandb sync <run_dir>/wandb/offline-run-*`"
        )
    # wandb is heavy and optional: import it only when a run asks for it.
    import wandb

    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
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
