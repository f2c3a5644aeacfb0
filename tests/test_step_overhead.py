"""The default run's training step is the model's forward and nothing more.

With ``precision=fp32``, ``qat=none``, no distillation or pruning, no converter
wraps the forward: the pipeline calls the DMP directly, so the step does what
torchrec's golden loop does for the same model (benchmarks/op_profile.py
compares the two op by op; the interaction is tests/test_interaction.py's).
"""

from __future__ import annotations

import torch

from tests.reference import synthetic_tables
from trainer.builder.compression import build_converters
from trainer.config.schema import to_config


def test_default_config_wraps_no_forward(compose_cfg) -> None:
    cfg = to_config(compose_cfg([]))
    tables = synthetic_tables(cfg)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    model = torch.nn.Linear(1, 1)
    assert converters.wrap_forward(model) is None, [c.name for c in converters]


def test_bf16_does_wrap_it(compose_cfg) -> None:
    # The check above can fail: a converter that acts does wrap the forward.
    cfg = to_config(compose_cfg(["precision=bf16"]))
    tables = synthetic_tables(cfg)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    assert converters.wrap_forward(torch.nn.Linear(1, 1)) is not None
