"""The serving model: exported at the end of training (``step``) or from a
checkpoint (``python -m trainer.export``: ``offline``)."""
