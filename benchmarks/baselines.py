"""The baselines of ``make bench``: plain PyTorch, torchrec's golden loop, the dense floor.

Each reads the batches shardrec's synthetic source drew up front
(``benchmarks.models.draw_batches``), so only the training loop differs; see
``benchmarks.models`` for what each contender is.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from benchmarks.models import Contender, Shape


def _feature_names(shape: Shape) -> list[str]:
    return [f"cat_{i}" for i in range(len(shape.table_rows()))]


def make_torchrec(shape: Shape, *, env: Any, batches: list) -> Contender:
    """torchrec's examples/golden_training/train_dlrm.py, written as it writes it."""
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    eb_configs = [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=shape.embedding_dim,
            num_embeddings=rows,
            feature_names=[feature],
        )
        for feature, rows in zip(_feature_names(shape), shape.table_rows(), strict=True)
    ]
    common = dict(
        embedding_bag_collection=EmbeddingBagCollection(
            tables=eb_configs, device=torch.device("meta")
        ),
        dense_in_features=shape.num_dense,
        dense_arch_layer_sizes=shape.dense_arch,
        over_arch_layer_sizes=shape.over_arch,
        dense_device=env.device,
    )
    if shape.arch == "dlrm_dcnv2":
        dlrm = DLRM_DCN(**common, dcn_num_layers=3, dcn_low_rank_dim=512)
    else:
        dlrm = DLRM(**common)
    train_model = DLRMTrain(dlrm)
    apply_optimizer_in_backward(
        RowWiseAdagrad, train_model.model.sparse_arch.parameters(), {"lr": 0.05}
    )
    model = DistributedModelParallel(module=train_model, device=env.device)
    optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=0.01),
    )
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    data = itertools.cycle(batches)

    def step(n: int) -> None:
        for _ in range(n):
            pipeline.progress(data)

    return Contender("torchrec", step, model=model)


class PlainDLRM(nn.Module):
    """DLRM from plain PyTorch: one EmbeddingBag per table, sparse gradients."""

    def __init__(self, shape: Shape, device: torch.device) -> None:
        from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch

        super().__init__()
        num_features = len(shape.table_rows())
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(rows, shape.embedding_dim, mode="sum", sparse=True, device=device)
            for rows in shape.table_rows()
        )
        self.dense_arch = DenseArch(shape.num_dense, shape.dense_arch, device=device)
        self.inter_arch = InteractionArch(num_sparse_features=num_features)
        d = shape.embedding_dim
        over_in = d + num_features * (num_features + 1) // 2
        self.over_arch = OverArch(over_in, shape.over_arch, device=device)

    def forward(self, dense: torch.Tensor, bags: list[tuple[torch.Tensor, torch.Tensor]]):
        pooled = torch.stack([t(v, o) for t, (v, o) in zip(self.tables, bags, strict=True)], 1)
        x = self.inter_arch(dense_features=self.dense_arch(dense), sparse_features=pooled)
        return self.over_arch(x).squeeze(-1)


def _plain_inputs(batch: Batch, device: torch.device) -> tuple:
    kjt = batch.sparse_features
    bags = []
    for jt in kjt.to_dict().values():
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(jt.lengths())[:-1]
        bags.append((jt.values().to(device), offsets.to(device)))
    return batch.dense_features.to(device), bags, batch.labels.to(device)


def make_pytorch(shape: Shape, *, env: Any, batches: list) -> Contender:
    if shape.arch != "dlrm":
        raise ValueError(f"the plain PyTorch DLRM has no {shape.arch!r}; use a dlrm shape")
    model = PlainDLRM(shape, env.device)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device] if env.device.type == "cuda" else None
    )
    optimizer = torch.optim.Adagrad(ddp.parameters(), lr=0.01)
    data = itertools.cycle([_plain_inputs(b, env.device) for b in batches])
    loss_fn = nn.BCEWithLogitsLoss()

    def step(n: int) -> None:
        for _ in range(n):
            dense, bags, labels = next(data)
            optimizer.zero_grad()
            loss_fn(ddp(dense, bags), labels).backward()
            optimizer.step()

    return Contender("pytorch", step)


def make_dense(shape: Shape, *, env: Any, batches: list) -> Contender:
    """The dense-only floor: the same MLPs and interaction, pooled embeddings given."""
    from torchrec.models.dlrm import DenseArch, InteractionDCNArch, OverArch
    from torchrec.modules.crossnet import LowRankCrossNet

    from trainer.models.interaction import FlatInteractionArch

    num_features, d = len(shape.table_rows()), shape.embedding_dim
    dense_arch = DenseArch(shape.num_dense, shape.dense_arch, device=env.device)
    if shape.arch == "dlrm_dcnv2":
        in_features = (num_features + 1) * d
        inter = InteractionDCNArch(
            num_sparse_features=num_features,
            crossnet=LowRankCrossNet(in_features=in_features, num_layers=3, low_rank=512),
        ).to(env.device)
        over_in = in_features
    else:
        # shardrec's interaction (torchrec's, bit for bit, gathered faster): the floor
        # is the dense part of the model shardrec trains.
        inter = FlatInteractionArch(num_sparse_features=num_features).to(env.device)
        over_in = d + num_features * (num_features + 1) // 2
    over_arch = OverArch(over_in, shape.over_arch, device=env.device)
    modules = nn.ModuleList([dense_arch, inter, over_arch])
    optimizer = torch.optim.Adagrad(modules.parameters(), lr=0.01)
    gen = torch.Generator(device=env.device).manual_seed(env.rank)
    pooled = torch.randn(shape.batch_size, num_features, d, device=env.device, generator=gen).mul_(
        0.1
    )
    data = itertools.cycle(
        [(b.dense_features.to(env.device), b.labels.to(env.device)) for b in batches]
    )
    loss_fn = nn.BCEWithLogitsLoss()

    def step(n: int) -> None:
        for _ in range(n):
            dense, labels = next(data)
            optimizer.zero_grad()
            x = inter(dense_features=dense_arch(dense), sparse_features=pooled)
            loss_fn(over_arch(x).squeeze(-1), labels).backward()
            optimizer.step()

    return Contender("dense", step)
