"""FlatInteractionArch computes torchrec's InteractionArch bit for bit, faster."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from trainer.config import TableConfig
from trainer.models import build_model
from trainer.models.interaction import FlatInteractionArch


@pytest.mark.parametrize("num_features,dim", [(1, 4), (3, 8), (26, 16)])
def test_same_output_and_gradients_as_torchrec(num_features: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(num_features)
    dense = torch.randn(64, dim, generator=gen)
    sparse = torch.randn(64, num_features, dim, generator=gen)
    grad = torch.randn(64, dim + num_features * (num_features + 1) // 2, generator=gen)
    results = []
    for arch in (InteractionArch(num_features), FlatInteractionArch(num_features)):
        d = dense.clone().requires_grad_()
        s = sparse.clone().requires_grad_()
        out = arch(d, s)
        out.backward(grad)
        results.append((out.detach(), d.grad, s.grad))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert torch.equal(ours, theirs)
    # Same state dict as torchrec's (both index buffers are non-persistent).
    assert FlatInteractionArch(num_features).state_dict() == {}


def test_dlrm_uses_it() -> None:
    tables = [
        TableConfig(name=f"t_{i}", num_embeddings=5, embedding_dim=4, feature_names=[f"c{i}"])
        for i in range(3)
    ]
    model = build_model(
        arch="dlrm",
        tables=tables,
        num_dense=2,
        dense_arch_layer_sizes=[4],
        over_arch_layer_sizes=[4, 1],
        device=torch.device("meta"),
    )
    assert isinstance(model.model.inter_arch, FlatInteractionArch)
    assert model.model.inter_arch.F == 3
