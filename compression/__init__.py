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

from compression.fake_quant import BITS, SERVING_DTYPES, fake_quantize_rows
from compression.qat_kernels import QATHandle, enable_embedding_qat

__all__ = ["BITS", "SERVING_DTYPES", "QATHandle", "enable_embedding_qat", "fake_quantize_rows"]
