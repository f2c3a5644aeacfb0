"""The small checks every validation module uses; each raises :class:`ConfigError`."""

from __future__ import annotations

from collections.abc import Sequence

from trainer.config.schema import ConfigError


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(key: str, value: float) -> None:
    check(value > 0, f"{key}={value} must be positive")


def layer_sizes(key: str, sizes: Sequence[int]) -> None:
    check(len(sizes) > 0, f"{key} is empty; give at least one layer size")
    for i, size in enumerate(sizes):
        positive(f"{key}[{i}]", size)
