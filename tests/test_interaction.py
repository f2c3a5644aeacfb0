"""shardrec's DLRM computes torchrec's bit for bit: the flat interaction, the lookup first."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from trainer.config.schema import TableConfig
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


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcnv2"])
def test_model_matches_torchrecs_dlrm_bit_for_bit(arch: str) -> None:
    """shardrec's DLRM (flat interaction, lookup first) against torchrec's own."""
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

    from tests.test_models import tiny_model

    data, ours = tiny_model(arch)
    inner = ours.model
    common = dict(
        embedding_bag_collection=inner.sparse_arch.embedding_bag_collection,
        dense_in_features=3,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )
    if arch == "dlrm":
        theirs = DLRMTrain(DLRM(**common))
    else:
        theirs = DLRMTrain(DLRM_DCN(**common, dcn_num_layers=2, dcn_low_rank_dim=4))
    assert type(theirs.model).forward is not type(inner).forward
    theirs.load_state_dict(ours.state_dict())
    batch = data.batch("train", 0, 16)
    # The sparse arch is still called (hooks on it see the pooled embeddings).
    seen: list[torch.Size] = []
    inner.sparse_arch.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    grads = []
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        loss, (_, logits, _) = model(batch)
        loss.backward()
        named = {n: p.grad for n, p in model.named_parameters()}
        grads.append((loss.detach(), logits.detach(), named))
    assert seen == [torch.Size([16, 3, 4])]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][2].keys() == grads[1][2].keys()
    for name, grad in grads[0][2].items():
        assert torch.equal(grad, grads[1][2][name]), name
