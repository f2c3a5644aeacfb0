"""Checkpoints with ``torch.distributed.checkpoint``: layout and loading
(``load``), saving, sync or async (``save``)."""
