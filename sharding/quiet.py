"""Keep the console for our own output: silence torch/torchrec/FBGEMM chatter.

Both entry points (``python -m trainer`` and ``python -m sharding.plan``) call
:func:`quiet_libraries` once Hydra has set up logging.

Example::

    quiet_libraries()                      # trainer: library warnings still show
    quiet_libraries(level=logging.ERROR)   # planner CLI: only errors
"""

from __future__ import annotations

import logging
import warnings


def _not_fbgemm_info(record: logging.LogRecord) -> bool:
    # FBGEMM logs each kernel's full argument list through the root logger.
    return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


def _not_missing_spec(record: logging.LogRecord) -> bool:
    # The planner warns on the root logger for every data-parallel table, which
    # has no sharding spec by design.
    return not record.getMessage().startswith("Sharding spec not found")


def quiet_libraries(*, level: int = logging.WARNING) -> None:
    """Deprecation warnings off; torchrec/FBGEMM loggers at ``level``."""
    for module in ("torchrec", "torch.distributed", "fbgemm_gpu", "torch.fx"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
    warnings.filterwarnings("ignore", message=".*HeuristicalStorageReservation.*")
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    root = logging.getLogger()
    root.addFilter(_not_missing_spec)
    for handler in root.handlers:
        handler.addFilter(_not_fbgemm_info)
