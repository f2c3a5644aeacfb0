"""Building a run: the model on ``meta``, the compression converters, the sharded model."""
