"""DLRM and DLRM-DCNv2 forward and backward on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from trainer.config.schema import TableConfig
from trainer.data import SyntheticCriteo, SyntheticDataConfig
from trainer.models import build_model


def tiny_model(arch: str, num_interactions: int = 2):
    """A 3-feature synthetic source (hotness 1, 2, 1) and a dim-4 model of ``arch`` on it."""
    torch.manual_seed(0)
    data = SyntheticCriteo(
        SyntheticDataConfig(
            num_dense=3,
            cardinalities=[10, 20, 5],
            hotness=[1, 2, 1],
            num_interactions=num_interactions,
        )
    )
    tables = [
        TableConfig(name=f"t_{f}", num_embeddings=rows, embedding_dim=4, feature_names=[f])
        for f, rows in zip(data.feature_names, data.cardinalities, strict=True)
    ]
    model = build_model(
        arch=arch,
        tables=tables,
        num_dense=3,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
        dcn_num_layers=2,
        dcn_low_rank_dim=4,
        device=torch.device("cpu"),
    )
    return data, model


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcnv2"])
def test_forward_backward_tiny(arch: str) -> None:
    data, model = tiny_model(arch)
    batch = data.batch("train", 0, 6)
    loss, (loss_detached, logits, labels) = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (6,) and torch.equal(labels, batch.labels)
    assert float(loss_detached) == float(loss.detach())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    table = model.model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight
    used = torch.unique(batch.sparse_features["cat_1"].values())
    assert table.grad[used].abs().sum() > 0
    unused = torch.ones(20, dtype=torch.bool)
    unused[used] = False
    assert table.grad[unused].abs().sum() == 0


def test_dcnv2_has_cross_layers() -> None:
    tables = [TableConfig(name="t", num_embeddings=5, embedding_dim=4, feature_names=["cat_0"])]
    model = build_model(
        arch="dlrm_dcnv2",
        tables=tables,
        num_dense=2,
        dense_arch_layer_sizes=[4],
        over_arch_layer_sizes=[4, 1],
        dcn_num_layers=3,
        dcn_low_rank_dim=2,
        device=torch.device("meta"),
    )
    names = [n for n, _ in model.named_parameters()]
    assert sum("crossnet.V_kernels" in n for n in names) == 3
    # Tables stay on meta until sharding (torchrec builds DCN's cross layers on CPU:
    # small dense weights that DMP moves and DDP syncs).
    ebc = model.model.sparse_arch.embedding_bag_collection
    assert all(p.is_meta for p in ebc.parameters())
