"""The teacher/student pair: two models trained on the same batch, as one module.

The student's architecture is ``distill.arch`` (default: the teacher's), e.g. a
DeepFM student (trainer/models/ctr.py) of a DLRM-DCNv2 teacher.

:class:`DistillTrain` is what gets planned, sharded, checkpointed and trained
when ``distill=online``: its state dict holds both models (``teacher.*``,
``student.*``), so one plan shards both models' tables and a checkpoint holds
both. Its forward returns ``(loss, (loss, logits, labels))`` like torchrec's
``DLRMTrain``, with ``logits`` a dict ``{"student": ..., "teacher": ...}`` (the
loop evaluates each head; the first is the served one). The loss is the
teacher's BCE plus the student's distillation loss (compression/distill.py),
whose soft target is the detached teacher logit.

The student has its own smaller tables, named ``s_<teacher field table>``
(and ``w_s_<...>`` wide tables if it is a DeepFM / Wide&Deep; so
``qat.table_bits`` and ``sharding.tables`` address them) over the same
features, or (``share_tables``) no tables at all: it reads the teacher's pooled
embeddings, so each table is looked up and updated once per step.

``pair.model`` is the served predictor (the student, with the teacher's
tables when shared), as ``DLRMTrain.model`` is for a plain model.

Example::

    teacher = build_unsharded(cfg, device=torch.device("meta"))
    pair = make_pair(teacher, tables=tables, distill=cfg.distill, model=cfg.model)
    loss, (_, logits, labels) = pair(batch)      # logits["student"], logits["teacher"]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.models.dlrm import DLRMTrain

from compression.distill import distill_loss
from trainer.config.schema import DistillConfig, ModelConfig, TableConfig
from trainer.config.tables import student_arch, student_tables
from trainer.models.dlrm import build_model


def _logits(dlrm: nn.Module, dense: Tensor, pooled: Any) -> Tensor:
    """The predictor's forward after its sparse arch: a DeepFM / Wide&Deep's own
    ``logits_from_pooled``, else DLRM's (``pooled``: (batch, features, dim))."""
    if hasattr(dlrm, "logits_from_pooled"):
        return dlrm.logits_from_pooled(dense, pooled).squeeze(-1)
    embedded_dense = dlrm.dense_arch(dense)
    concatenated = dlrm.inter_arch(dense_features=embedded_dense, sparse_features=pooled)
    return dlrm.over_arch(concatenated).squeeze(-1)


class DistillTrain(nn.Module):
    """Teacher and student predictors with the distillation loss (see the module docstring).

    ``soft``: whether the student's loss has the soft term (set per step by
    compression.distill.DistillConverter: off during the warm-up).
    ``freeze_teacher``: the teacher runs without gradient and adds no loss.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        alpha: float,
        temperature: float,
        share_tables: bool,
        freeze_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.alpha = alpha
        self.temperature = temperature
        self.share_tables = share_tables
        self.freeze_teacher = freeze_teacher
        self.soft = True
        if freeze_teacher:
            # The dense parts only (so DDP leaves them out). The tables keep their
            # fused optimizer, which FBGEMM only runs when a gradient reaches them,
            # and none does: the frozen teacher's forward runs without autograd.
            for name, arch in self.teacher.named_children():
                if name != "sparse_arch":
                    arch.requires_grad_(False)

    @property
    def model(self) -> nn.Module:
        """The served predictor ``(dense, sparse) -> logit``: the student."""
        if not self.share_tables:
            return self.student
        served = copy.copy(self.student)  # its own module dict: the student keeps None
        served._modules = {**self.student._modules, "sparse_arch": self.teacher.sparse_arch}
        return served

    def forward(self, batch: Any) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor], Tensor]]:
        labels = batch.labels.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_teacher):
            pooled = self.teacher.sparse_arch(batch.sparse_features)
            teacher = _logits(self.teacher, batch.dense_features, pooled)
        if not self.share_tables:
            pooled = self.student.sparse_arch(batch.sparse_features)
        student = _logits(self.student, batch.dense_features, pooled)
        loss = distill_loss(
            student,
            teacher,
            labels,
            alpha=self.alpha,
            temperature=self.temperature,
            soft=self.soft,
        )
        if not self.freeze_teacher:
            loss = loss + F.binary_cross_entropy_with_logits(teacher, labels)
        logits = {"student": student.detach(), "teacher": teacher.detach()}
        return loss, (loss.detach(), logits, batch.labels.detach())


def _num_dense(predictor: nn.Module) -> int:
    """The batches' dense width a predictor was built for."""
    if hasattr(predictor, "num_dense"):
        return int(predictor.num_dense)
    # A DLRM built elsewhere: its bottom MLP's input width (1 also for no dense features,
    # which ConstantWhenEmptyDenseArch handles in a DLRM student too).
    return next(m for m in predictor.dense_arch.modules() if isinstance(m, nn.Linear)).in_features


def make_pair(
    teacher: DLRMTrain,
    *,
    tables: Sequence[TableConfig],
    distill: DistillConfig,
    model: ModelConfig,
) -> DistillTrain:
    """The pair of ``teacher`` (a DLRMTrain, any device) and the configured student.

    ``tables``: the teacher's; the student gets :func:`student_tables` of them,
    or none with ``distill.share_tables``.
    """
    device = next(teacher.parameters()).device
    shared = distill.share_tables
    # What the teacher was built with: dense width, and table dtype (precision).
    ebc = teacher.model.sparse_arch.embedding_bag_collection
    data_type = ebc.embedding_bag_configs()[0].data_type
    student = build_model(
        # Its own architecture (e.g. a deepfm student of a dlrm_dcnv2 teacher);
        # with shared tables validation keeps it the teacher's.
        arch=student_arch(distill, model),
        tables=tables if shared else student_tables(tables, embedding_dim=distill.embedding_dim),
        num_dense=_num_dense(teacher.model),
        dense_arch_layer_sizes=distill.dense_arch_layer_sizes,
        over_arch_layer_sizes=distill.over_arch_layer_sizes,
        device=device,
        # Shared: the student's own collection is a placeholder, never allocated.
        tables_device=torch.device("meta") if shared else device,
        dcn_num_layers=model.dcn_num_layers,
        dcn_low_rank_dim=model.dcn_low_rank_dim,
        table_data_type=data_type,
    ).model  # the predictor: the pair computes the student's loss itself
    if shared:
        student.sparse_arch = None
    return DistillTrain(
        teacher.model,
        student,
        alpha=distill.alpha,
        temperature=distill.temperature,
        share_tables=shared,
        freeze_teacher=distill.freeze_teacher,
    )
