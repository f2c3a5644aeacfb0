"""A checkpoint's saved config: read it back, and check that this run may resume from it.

A checkpoint directory holds the resolved config it was written with
(``config.yaml``, trainer/checkpoint/load.py); the offline export rebuilds the
model from it, and a resume refuses a checkpoint of another model or data.

Example::

    cfg = read_config(Path("outputs/run/checkpoints/step_800"))
    check_resumable(Path("outputs/run/checkpoints/step_800"), this_run_cfg)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from trainer.checkpoint.load import CONFIG_FILE
from trainer.config.schema import Config, config_from_yaml
from trainer.errors import ConfigError

# The settings a resumed run must share with its checkpoint.
_MUST_MATCH = ("model", "data")


def read_config(path: Path) -> Config:
    """The resolved config a checkpoint was written with (schema-checked)."""
    return config_from_yaml((path / CONFIG_FILE).read_text())


def check_resumable(path: Path, cfg: Config) -> None:
    """Raises ConfigError when the run's model or data differ from the checkpoint's."""
    saved = read_config(path)
    diffs = []
    for group in _MUST_MATCH:
        old = _flat(dataclasses.asdict(getattr(saved, group)))
        new = _flat(dataclasses.asdict(getattr(cfg, group)))
        diffs += [
            f"{group}.{key}: checkpoint {old.get(key)}, this run {new.get(key)}"
            for key in {**old, **new}
            if old.get(key) != new.get(key)
        ]
    if diffs:
        raise ConfigError(
            f"trainer.resume={path} was written by a different model or data ("
            + "; ".join(diffs[:5])
            + "); resume with the checkpoint's settings (see its config.yaml) or start fresh "
            "with trainer.resume=null"
        )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
    return out
