"""Closed string choices in the schema: a typo fails at compose time, listing them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import StrEnum


def choices(name: str, values: Sequence[str]) -> type[StrEnum]:
    """A string enum whose members are their own names, so a typo fails at compose
    time with the allowed values listed, and members still compare equal to strings."""
    # Pickled (configs cross processes) by the module that names it, not this one.
    module = sys._getframe(1).f_globals["__name__"]
    return StrEnum(name, {v: v for v in values}, module=module)  # type: ignore[return-value]
