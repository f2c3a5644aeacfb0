"""Validation of ``online.*`` (the day walk, trainer/online/), for ``config.validate``.

Example::

    validate_online(cfg)   # ConfigError naming the key and the fix
"""

from __future__ import annotations

from trainer.config.checks import check, positive
from trainer.config.schema import Config
from trainer.config.validate_follow import validate_follow
from trainer.data.synthetic_config import SyntheticDataConfig


def validate_online(cfg: Config) -> None:
    """``online.days`` needs the drifting synthetic stream with at least that many days."""
    o = cfg.online
    validate_follow(cfg)  # online.follow: trainer/online/follow.py
    positive("online.publish_timeout_s", o.publish_timeout_s)
    positive("online.publish_stop_wait_s", o.publish_stop_wait_s)
    check(o.days >= 0, f"online.days={o.days} must be >= 0 (0: no day walk)")
    if not o.days:
        return
    check(
        isinstance(cfg.data, SyntheticDataConfig),
        f"online.days={o.days} walks the days of the drifting synthetic stream; use "
        f"data=synthetic data.days={o.days}, or online.days=0",
    )
    check(
        cfg.data.days >= o.days,
        f"online.days={o.days} walks more days than data.days={cfg.data.days} has; set "
        f"data.days={o.days}",
    )
    positive("online.steps_per_day", o.steps_per_day)
    check(
        o.first_day_steps >= 0,
        f"online.first_day_steps={o.first_day_steps} must be >= 0 (0: online.steps_per_day)",
    )
    check(
        o.publish_every_steps >= 0,
        f"online.publish_every_steps={o.publish_every_steps} must be >= 0 (0: each day's end)",
    )
    positive("online.publish_keep", o.publish_keep)
