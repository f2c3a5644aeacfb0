"""``python -m trainer [overrides]`` (or ``torchrun ... -m trainer``).

Composes conf/, converts it to typed dataclasses, trains, prints the summary.
A configuration mistake ends in one line naming the key and the fix (``shardrec:
config error: ...``, exit status 2), not a traceback: compose mistakes (unknown
key, wrong type, unknown choice) are explained when Hydra's compose fails (a
sweep's before its first job; trainer/config/compose.py); cross-field ones by
trainer/config/validate.py before any process group exists; the few that need
the device or the plan on every rank alike.

The task returns the final eval AUC: the objective of ``hydra/sweeper=optuna``
(a search, ``+sweep=search/lr``; its trials prune themselves, trainer/search.py).

Example::

    python -m trainer trainer.num_steps=500 sharding=table_wise
    python -m trainer -m +sweep=search/lr hydra.sweeper.n_trials=20
    main(["trainer.num_steps=5", "hydra.run.dir=/tmp/run"])   # the same, from Python
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sharding.quiet import quiet_libraries
from trainer.config.compose import (
    CONF_DIR,
    EXIT_CONFIG_ERROR,
    HydraRaises,
    composes_up_front,
    config_error_line,
    exit_on_compose_error,
    typed_config,
)
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import ConfigError, register_configs

log = logging.getLogger("trainer")
EXPORT_KEYS = ["auc", "logloss", "bytes", "fp32_bytes", "max_abs_logit_diff"]


def format_summary(summary: dict, keys: list[str] | None = None) -> str:
    keys = keys or [
        "auc",
        "oracle_auc",
        "logloss",
        "ne",
        "calibration",
        "samples_per_sec",
        "steps",
        "world_size",
        "strategy",
        "precision",
        "embedding_bytes",
    ]
    width = max(len(k) for k in keys)
    lines = []
    for key in keys:
        if key in summary:
            value = summary[key]
            shown = f"{value:,.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the trainer's command line (``argv``: the overrides, default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    register_resolvers()
    global _raising
    sweep = composes_up_front(argv)
    if sweep:
        exit_on_compose_error(argv)  # every job of the sweep, before the first starts
    _raising = None if sweep else HydraRaises()
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # Hydra reads its arguments here
    try:
        with _raising or contextlib.nullcontext():
            _app()
    except Exception:
        if _raising is None or _raising.task_started:
            raise  # the task's own error, reported by Hydra or by the task
        exit_on_compose_error(argv)  # Hydra could not compose: one line and exit 2
        raise  # not a config mistake (an unwritable run directory...): as it is
    finally:
        sys.argv = saved


_raising: HydraRaises | None = None  # a single run's, while Hydra composes it


# An absolute path: Hydra resolves a relative one from how the module was started,
# which differs between ``python -m trainer`` and ``main([...])`` called from Python.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(dict_cfg: DictConfig) -> float | None:
    if _raising is not None:
        _raising.task_starts()  # from here on Hydra reports errors its usual way
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg = typed_config(dict_cfg, HydraConfig.get().overrides.task)
        quiet_libraries()  # before FBGEMM's import logs a line per kernel library
        from trainer.search import pruning_from_hydra
        from trainer.train import train  # heavy imports once the config is known good

        on_eval = pruning_from_hydra() if in_sweep else None  # an optuna trial's pruning
        summary = train(cfg, run_dir=run_dir, on_eval=on_eval)
    except ConfigError as err:
        if in_sweep:  # sys.exit would end the whole sweep; Hydra goes on to the next job
            log.error("config error: %s", err)  # into <job>/__main__.log: the sweep report
            raise
        print(config_error_line(err), file=sys.stderr)  # on every rank: each raised it
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception:
        if in_sweep:
            log.exception("job failed")
        raise
    # torchrun sets RANK; ``srun python -m trainer`` only SLURM_PROCID: one summary either way
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"\nsummary ({run_dir / 'summary.json'})")
        print(format_summary(summary))
        if "export" in summary:
            print("export (quantized serving model)")
            print(format_summary(summary["export"], EXPORT_KEYS))
    auc = summary.get("auc")
    return None if auc is None else float(auc)  # the sweeper's objective (optuna)


if __name__ == "__main__":
    main()
