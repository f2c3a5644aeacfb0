"""Int8 weight-only QAT of the dense MLPs (``qat.dense_bits=8``) and its export.

(1) The fake-quantized weight is torch's own per-channel int8 quantization
(``torch.quantize_per_channel``, ±127) dequantized, and the served module's
int8 codes rebuild it bit for bit; (2) the gradient is straight-through;
(3) a one-process ``qat=int4 qat.dense_bits=8`` run with ``trainer.export=true``
serves what it trained and evaluated (logits within 1e-5), from int8 Linears;
(4) any other ``qat.dense_bits`` is a ConfigError naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression.bundle import load_program
from compression.dense_qat import (
    Int8WeightOnlyLinear,
    dense_linears,
    enable_dense_qat,
    fake_quantize_linear_weight,
    quantize_dense_for_serving,
)
from tests.reference import unsharded_model
from tests.test_sharding_equivalence import tiny_config
from tests.test_train_e2e import TINY
from trainer.config.schema import ConfigError, to_config
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(16, 24) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different ranges
    w[3] = 0.0  # an all-zero row must not turn nan
    return w


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_fake_quantized_weight_is_torchs_per_channel_int8() -> None:
    w = _weight()
    fake = fake_quantize_linear_weight(w)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    zero_point = torch.zeros(16, dtype=torch.int64)
    q = torch.quantize_per_channel(w, scale.double(), zero_point, 0, torch.qint8)
    assert int(q.int_repr().abs().max()) == 127  # the range is ±127, never -128
    assert torch.equal(fake, q.dequantize())
    assert torch.equal(fake[3], torch.zeros(24)) and not fake.isnan().any()
    assert (fake - w).abs().max() > 1e-3  # it did quantize (by up to half a step)
    assert ((fake - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()

    linear = nn.Linear(24, 16)
    with torch.no_grad():
        linear.weight.copy_(w)
    served = Int8WeightOnlyLinear.from_linear(linear)
    assert served.codes.dtype == torch.int8 and served.scale.dtype == torch.float32
    assert torch.equal(served.codes, q.int_repr())  # torch's own int8 codes
    assert torch.equal(served.codes.float() * served.scale[:, None], fake)  # bit for bit
    x = torch.randn(5, 24)
    assert torch.equal(served(x), nn.functional.linear(x, fake, linear.bias))


def test_gradient_is_straight_through() -> None:
    w = _weight().requires_grad_(True)
    upstream = torch.randn(16, 24)
    fake_quantize_linear_weight(w).backward(upstream)
    assert torch.equal(w.grad, upstream)

    # In the model, each dense Linear's fp32 master gets the gradient taken at
    # its quantized weight: training the plain model whose Linears hold the
    # fake-quantized weights gives the same loss and gradients.
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    qat = unsharded_model(cfg, device=torch.device("cpu"))
    plain = unsharded_model(cfg, device=torch.device("cpu"))
    plain.load_state_dict(qat.state_dict())
    names = enable_dense_qat(qat)
    assert names == [name for name, _ in dense_linears(plain)] and len(names) == 4
    with torch.no_grad():
        for (_, q), (_, p) in zip(dense_linears(qat), dense_linears(plain)):
            p.weight.copy_(q.weight)
            assert not torch.equal(p.weight, q.parametrizations.weight.original)
    batch = SyntheticCriteo(cfg.data).batch("train", 0, 64)
    losses = [m(batch)[0] for m in (qat, plain)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (_, q), (_, p) in zip(dense_linears(qat), dense_linears(plain)):
        assert torch.equal(q.parametrizations.weight.original.grad, p.weight.grad)
        assert p.weight.grad.abs().max() > 0

    # The served copy computes the QAT model's eval logits; the QAT model keeps
    # its parametrized Linears.
    qat.eval()
    served = quantize_dense_for_serving(qat.model)
    assert all(parametrize.is_parametrized(m, "weight") for _, m in dense_linears(qat))
    with torch.no_grad():
        want = qat.model(batch.dense_features, batch.sparse_features)
        got = served(batch.dense_features, batch.sparse_features)
    assert torch.equal(got, want)


def test_qat_int4_dense_int8_run_serves_what_it_trained(tmp_path: Path, compose_cfg) -> None:
    from trainer.train import train  # in this process: a world of one

    cfg = to_config(
        compose_cfg(
            [
                *TINY,
                "qat=int4",
                "qat.dense_bits=8",
                "trainer.export=true",
                "trainer.progress_bar=false",
                "trainer.plot=false",
            ]
        )
    )
    summary = train(cfg, run_dir=tmp_path)
    export = summary["export"]
    assert export["dense_bits"] == 8 and set(export["bits"].values()) == {4}
    print(f"dense int8 + int4 tables: max |logit diff| {export['max_abs_logit_diff']:.3g}")
    assert export["max_abs_logit_diff"] <= 1e-5  # measured: 0
    assert abs(export["auc"] - summary["auc"]) < 1e-4

    # The bundle's program (torch.export, no pickle): its dense weights are int8 codes.
    served = load_program(tmp_path / "bundle" / "model.pt2")
    dense = {n: b for n, b in served.state_dict().items() if not n.startswith("tables.")}
    codes = {n: b for n, b in dense.items() if b.dtype == torch.int8}
    num_linears = len(dense_linears(unsharded_model(cfg, device=torch.device("meta"))))
    assert len(codes) == num_linears == 5  # smoke: dense arch 2, over arch 3
    assert not [n for n, b in dense.items() if n.endswith(".weight") and b.dtype == torch.float32]
    # The export's bytes count the packed tables and the int8 codes (1 B per weight)
    # with their fp32 scales and biases.
    assert export["table_bytes"] == served.tables.weights.numel()
    code_bytes = sum(b.numel() for b in codes.values())
    dense_bytes = export["bytes"] - export["table_bytes"]
    fp32_dense_bytes = export["fp32_bytes"] - export["fp32_table_bytes"]
    assert code_bytes < dense_bytes < fp32_dense_bytes / 2  # measured: 37264 of 118828


@pytest.mark.parametrize("bits", [4, 16, -8])
def test_dense_bits_other_than_0_or_8_is_a_config_error(compose_cfg, bits: int) -> None:
    cfg = to_config(compose_cfg(["trainer=smoke", f"qat.dense_bits={bits}"]))
    with pytest.raises(ConfigError, match=rf"qat\.dense_bits={bits}.*qat\.dense_bits=8"):
        validate(cfg)
