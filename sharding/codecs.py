"""Quantized communication: fp16/bf16 codecs for the embedding all-to-alls and
reduce-scatters, from FBGEMM through torchrec's QCommsConfig.

Forward quantizes the pooled embeddings sent back to each rank; backward
quantizes their gradients. It halves the bytes on the wire at the cost of
rounding. The codecs run on gloo as well as NCCL (the equivalence tests check
a row-wise run with them stays close to the fp32 reference, and is not equal).

Example::

    registry = comm_codecs(forward="fp16", backward="bf16", world_size=8, device=device)
    sharders = embedding_sharders(qcomm_codecs_registry=registry)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchrec.distributed.fbgemm_qcomm_codec import (
    CommType,
    QCommsConfig,
    get_qcomm_codecs_registry,
)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": CommType.FP32, "fp16": CommType.FP16, "bf16": CommType.BF16}


def comm_codecs(
    *, forward: str, backward: str, world_size: int, device: torch.device
) -> dict[str, Any] | None:
    """The codec registry; None when both directions are fp32 or nothing is sent."""
    for key, value in (("forward", forward), ("backward", backward)):
        if value not in PRECISIONS:
            raise ValueError(
                f"sharding.comm_{key}={value!r} is not known; use one of {list(PRECISIONS)}"
            )
    if forward == backward == "fp32":
        return None
    if world_size == 1:
        log.warning(
            "sharding.comm_forward/comm_backward have no effect with one process: "
            "there is no all-to-all to compress"
        )
        return None
    return get_qcomm_codecs_registry(
        QCommsConfig(
            forward_precision=PRECISIONS[forward], backward_precision=PRECISIONS[backward]
        ),
        device=device,
    )
