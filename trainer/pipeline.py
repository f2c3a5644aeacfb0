"""torchrec train pipelines, and running one until its batches are spent.

Example::

    pipeline = make_pipeline("sparse_dist", model, optimizer, device)
    for loss, logits, labels in drain(pipeline, batches):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

PIPELINES = {"sparse_dist": TrainPipelineSparseDist, "base": TrainPipelineBase}


def make_pipeline(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    model_fwd: Callable[[Any], Any] | None = None,
) -> Any:
    """``sparse_dist`` overlaps the next batch's input all-to-all with this batch's compute.

    ``model_fwd`` replaces ``model(batch)`` (e.g. the same call under autocast).
    """
    return PIPELINES[name](model, optimizer, device, custom_model_fwd=model_fwd)


def drain(pipeline: Any, batches: Iterator[Any]) -> Iterator[Any]:
    """Yields the pipeline's outputs until it has run every batch of ``batches``."""
    while True:
        try:
            yield pipeline.progress(batches)
        except StopIteration:
            return
