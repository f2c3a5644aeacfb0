"""The compression settings' closed choices, without torch: the config schema
checks them before anything heavy is imported (each module re-exports its own)."""

PRECISIONS = ("fp32", "bf16", "fp16")  # compression/precision.py
RANGES = ("minmax", "mse")  # compression/row_range.py
LOWRANK_DENSE_MODES = ("none", "from_start", "svd")  # compression/lowrank_dense.py
LOWRANK_DENSE_ALLOCATIONS = ("per_layer", "global")
