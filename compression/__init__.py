"""Making the model cheaper: precision, QAT, distillation, quantized export.

Each step is a converter with keyword-only arguments that the trainer composes
in one documented order. Quantization-aware training of the tables runs on the
sharded model (after DistributedModelParallel), because it hooks the FBGEMM
kernels that hold each rank's table shards::

    built = build(cfg, env)
    qat = enable_embedding_qat(built.model, bits=4)   # or {"t_cat_0": 4, "t_cat_1": 8}
    served_rows = fake_quantize_rows(rows, bits=4)    # what the int4 serving model sees

This package never imports ``trainer``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compression.fake_quant import BITS, SERVING_DTYPES, fake_quantize_rows
    from compression.qat_kernels import QATHandle, enable_embedding_qat

# Imported on first use (PEP 562): ``compression.names`` alone (the config
# schema's choices) does not pull in torch and FBGEMM.
_EXPORTS = {
    "BITS": "compression.fake_quant",
    "SERVING_DTYPES": "compression.fake_quant",
    "fake_quantize_rows": "compression.fake_quant",
    "QATHandle": "compression.qat_kernels",
    "enable_embedding_qat": "compression.qat_kernels",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compression' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["BITS", "SERVING_DTYPES", "QATHandle", "enable_embedding_qat", "fake_quantize_rows"]
