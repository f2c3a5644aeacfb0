"""The day walk's data source: one drifting synthetic stream, one day at a time.

:class:`DayStream` is the :class:`trainer.data.source.DataSource` the walk's
``Trainer`` reads: it delegates to ``SyntheticSource(cfg, day=t)`` for the
current day ``t`` (trainer/data/drift.py) and switches with :meth:`set_day`. As
the checkpoint's ``data`` entry it holds the day beside the day's fingerprint,
so a resumed walk goes on with the day its checkpoint was written on.

Example::

    stream = DayStream(SyntheticDataConfig(days=7))
    stream.set_day(3)
    stream.reference_metrics()          # {"oracle_auc": ...} of day 3
    stream.state_dict()["day"]          # tensor(3)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torchrec.datasets.utils import Batch

from trainer.data.loader import eval_slices
from trainer.data.source import FeatureSpec
from trainer.data.synthetic import SyntheticSource
from trainer.data.synthetic_config import SyntheticDataConfig


class DayStream:
    """Day ``day`` of ``cfg``'s drifting stream; ``first``: that day's source, if
    already open (``trainer.config.validate.open_source``)."""

    def __init__(
        self, cfg: SyntheticDataConfig, *, day: int = 0, first: SyntheticSource | None = None
    ) -> None:
        self.cfg = cfg
        self.current = first if first is not None and first.day == day else None
        self.eval_indices: torch.Tensor | None = None  # eval_only's part of the eval set
        self.set_day(day)

    def set_day(self, day: int) -> None:
        """Reads day ``day`` from now on (ValueError past ``data.days``)."""
        if self.current is None or self.current.day != day:
            self.current = SyntheticSource(self.cfg, day=day)

    @property
    def day(self) -> int:
        assert self.current is not None
        return self.current.day

    @property
    def source(self) -> SyntheticSource:
        assert self.current is not None
        return self.current

    @property
    def features(self) -> list[FeatureSpec]:
        return self.source.features  # every day's: the tables hold all days' ids

    @property
    def num_dense(self) -> int:
        return self.source.num_dense

    @property
    def num_eval_samples(self) -> int:
        if self.eval_indices is not None:
            return self.eval_indices.numel()
        return self.source.num_eval_samples

    @contextlib.contextmanager
    def eval_only(self, indices: torch.Tensor) -> Iterator[None]:
        """Within it the eval set is the day's eval samples ``indices`` (int64, the same
        on every rank): ``Trainer.evaluate`` on a part, e.g. the samples with new ids."""
        self.eval_indices = indices
        try:
            yield
        finally:
            self.eval_indices = None

    def train_batches(
        self, *, batch_size: int, rank: int, world_size: int, first_step: int, num_steps: int
    ) -> Iterator[Batch]:
        """The day's samples at the walk's global steps (any step addresses the day's
        stream: its samples are a function of their index)."""
        return self.source.train_batches(
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            first_step=first_step,
            num_steps=num_steps,
        )

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        part = self.eval_indices
        if part is None:
            return self.source.eval_batches(batch_size=batch_size, rank=rank, world_size=world_size)
        slices = eval_slices(part.numel(), batch_size=batch_size, rank=rank, world_size=world_size)
        return (self.source.batch_at("eval", part[lo : lo + size]) for lo, size in slices)

    def batch(self, split: str, start: int, size: int) -> Batch:
        return self.source.batch(split, start, size)

    def reference_metrics(self) -> dict[str, float]:
        return self.source.reference_metrics()

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def state_dict(self) -> dict[str, Any]:
        return {**self.source.state_dict(), "day": torch.tensor(self.day, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Switches to the checkpoint's day, then checks its fingerprint."""
        if "day" not in state:
            raise ValueError(
                "the checkpoint holds no day (it was not written by a day walk); resume a "
                "walk from its own run directory, or start fresh with trainer.resume=null"
            )
        day = int(state["day"])
        try:
            self.set_day(day)
        except ValueError as err:
            raise ValueError(f"the checkpoint was written on day {day}: {err}") from None
        self.source.load_state_dict(state)
