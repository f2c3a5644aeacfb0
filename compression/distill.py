"""Online distillation: the student's loss, and the converter that pairs the models.

The teacher and the student train together on each batch. The student's loss is

    alpha * BCE(s, y) + (1 - alpha) * T^2 * BCE(sigmoid(s / T), sigmoid(t / T).detach())

with ``s`` and ``t`` the student's and the teacher's logits and ``y`` the labels
(Hinton et al.'s soft targets, for a binary click; ``T^2`` keeps the soft term's
gradient on the scale of the hard one). The teacher's logits are detached: no
gradient of the soft term reaches the teacher, its arches or its tables.

:class:`DistillConverter` acts at three moments: ``wrap_model`` turns the meta
teacher into the pair (so one plan shards both models' tables), ``wrap_forward``
counts training steps and switches the soft term on after ``warmup_steps``,
and the step count is checkpoint state. The pair module itself is the
trainer's (``trainer/models/distill.py``): this package never imports it.

Example::

    loss = distill_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0)
    converter = DistillConverter(make_pair=lambda teacher: Pair(teacher, student),
                                 warmup_steps=100)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint import StorageReader

from compression.converter import Converter, Forward


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    soft: bool = True,
) -> Tensor:
    """The student's loss (module docstring); ``soft=False``: labels alone (warm-up)."""
    hard = F.binary_cross_entropy_with_logits(student_logits, labels)
    if not soft:
        return hard
    target = torch.sigmoid(teacher_logits.detach() / temperature)
    soft_term = F.binary_cross_entropy_with_logits(student_logits / temperature, target)
    return alpha * hard + (1 - alpha) * temperature**2 * soft_term


def load_teacher(model: nn.Module, checkpoint: str, *, storage_reader: StorageReader) -> None:
    """Collective: the teacher's weights from a plain run's DCP checkpoint, resharded.

    A plain run saved its ``DLRMTrain`` under the ``model`` entry (``model.<name>``);
    the pair's teacher holds the same tensors as ``teacher.<name>``. Only the
    weights are read: the teacher's optimizer state starts fresh. ``storage_reader``
    reads ``checkpoint``: one that never unpickles (DCP's own ``FileSystemReader``
    unpickles ``.metadata``, i.e. runs whatever code a crafted file holds).
    """
    state = model.state_dict()
    teacher = {
        "model." + key.removeprefix("teacher."): value
        for key, value in state.items()
        if key.startswith("teacher.")
    }
    try:
        dcp.load({"model": teacher}, storage_reader=storage_reader)
    except Exception as err:  # a checkpoint of another model (names or shapes differ)
        raise ValueError(
            f"distill.teacher_checkpoint={checkpoint}: cannot load the teacher from it "
            f"({type(err).__name__}: {str(err)[:300]}); give a checkpoint of a plain run "
            f"(distill=none) with the same model.* settings"
        ) from err
    model.load_state_dict(state)


class DistillConverter(Converter):
    """Pairs the teacher with a student before planning; warms up, then distills.

    ``make_pair(teacher) -> pair``: the pair module; it has a ``soft`` attribute
    (bool) that this converter sets before each forward. ``teacher_reader(path)``:
    the DCP storage reader for ``teacher_checkpoint``, one that never unpickles
    (the trainer's ``SafeReader``); required with a ``teacher_checkpoint``.
    """

    name = "distill"

    def __init__(
        self,
        *,
        make_pair: Callable[[nn.Module], nn.Module],
        warmup_steps: int,
        teacher_checkpoint: str | None = None,
        teacher_reader: Callable[[str], StorageReader] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        if teacher_checkpoint and teacher_reader is None:
            raise ValueError("DistillConverter: a teacher_checkpoint needs a teacher_reader")
        self.make_pair = make_pair
        self.warmup_steps = warmup_steps
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_reader = teacher_reader
        self.settings = dict(settings or {})
        self.pairs: list[nn.Module] = []
        self.step = 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.make_pair(model)

    def convert_sharded(
        self, model: nn.Module, *, device: torch.device, process_group: Any
    ) -> None:
        self.pairs = [m for m in model.modules() if hasattr(m, "soft")]
        if not self.pairs:
            raise ValueError("distill: the sharded model holds no teacher/student pair")
        if self.teacher_checkpoint and self.teacher_reader is not None:
            reader = self.teacher_reader(self.teacher_checkpoint)
            load_teacher(model, self.teacher_checkpoint, storage_reader=reader)

    def wrap_forward(self, forward: Forward) -> Forward:
        def distilling(batch: Any) -> Any:
            # Steps counted in training only (the pipeline also runs eval batches).
            training = all(p.training for p in self.pairs)
            for p in self.pairs:
                p.soft = self.step >= self.warmup_steps
            out = forward(batch)
            if training:
                self.step += 1
            return out

        return distilling

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])

    def summary(self) -> dict[str, Any]:
        return {"distill": {**self.settings, "warmup_steps": self.warmup_steps}}
