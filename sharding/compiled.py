"""Loading numba-compiled loops, with the slower torch / FBGEMM path as the fallback.

``trainer/data/slot_draw.py`` (the synthetic draw) and ``sharding/tbe_cpu.py`` (the
tables' CPU backward) each keep their loops in a module that imports numba and
compiles with ``cache=True``. Importing it fails in two ways: numba is not
installed (``ImportError``: quietly the fallback), or numba cannot load, e.g. no
writable cache directory next to the code (a warning that names the fix).

Example::

    def _load():
        from sharding.tbe_cpu_kernel import backward_rowwise_adagrad
        return backward_rowwise_adagrad

    kernel = load_compiled(_load, log=log, what="the compiled embedding backward",
                           fallback="FBGEMM's runs (the same updates, slower)")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def load_compiled(
    load: Callable[[], T], *, log: logging.Logger, what: str, fallback: str
) -> T | None:
    """``load()``, or None where it cannot import numba's loops (see the module docstring)."""
    try:
        return load()
    except ImportError:  # numba is not installed
        return None
    except Exception as err:  # noqa: BLE001 - e.g. no writable cache dir for numba
        log.warning(
            "%s is off, %s: %s. Where numba cannot write next to the code, set "
            "NUMBA_CACHE_DIR to a writable directory",
            what,
            fallback,
            err,
        )
        return None
