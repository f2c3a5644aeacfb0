"""Validation of follow mode (``online.follow``, trainer/online/follow.py), for
``config.validate_online``.

Example::

    validate_follow(cfg)   # ConfigError naming the key and the fix
"""

from __future__ import annotations

from trainer.config.checks import check, positive
from trainer.config.schema import Config
from trainer.data.data_configs import PreparedDataConfig


def validate_follow(cfg: Config) -> None:
    """Follow mode reads a partitioned prepared dataset and trains with no last step."""
    o = cfg.online
    if not o.follow:
        return
    check(
        isinstance(cfg.data, PreparedDataConfig),
        "online.follow=true trains the partitions of a prepared dataset; use data=criteo or "
        "data=table with data.dir=DIR written by python -m trainer.prepare ... data.partition=NAME",
    )
    check(not o.days, f"online.follow=true and online.days={o.days}: pick one (online.days=0)")
    check(o.follow_steps >= 0, f"online.follow_steps={o.follow_steps} must be >= 0 (0: a pass)")
    check(o.poll_s > 0, f"online.poll_s={o.poll_s} must be > 0 (seconds between looks)")
    check(
        o.idle_timeout_s >= 0,
        f"online.idle_timeout_s={o.idle_timeout_s} must be >= 0 (0: wait for ever)",
    )
    check(
        str(cfg.optim.dense_lr_schedule) == "constant",
        f"online.follow=true has no last step, so optim.dense_lr_schedule="
        f"{cfg.optim.dense_lr_schedule} (a decay to 0 at trainer.num_steps) does not fit; "
        "pass optim.dense_lr_schedule=constant",
    )
    check(
        o.publish or not cfg.trainer.export,
        "online.follow=true has no last step to export at, so trainer.export=true would write "
        "no bundle: pass online.publish=true (a bundle after each partition, exports/LATEST)",
    )
    check(
        o.publish_every_steps >= 0,
        f"online.publish_every_steps={o.publish_every_steps} must be >= 0 "
        "(0: at each partition's end)",
    )
    positive("online.publish_keep", o.publish_keep)
