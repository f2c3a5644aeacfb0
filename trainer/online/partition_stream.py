"""Follow mode's data source: the partitions of a prepared dataset, one at a time.

:class:`PartitionStream` is the :class:`trainer.data.source.DataSource` the
follow job's ``Trainer`` reads. It opens one partition (an ordinary prepared
directory, read by :class:`trainer.data.shards.ShardSource`) and says where the
job stands: the partition's index in ``manifest.json`` and the global steps it
trains, ``[start_step, end_step)``; global step ``g`` reads the partition's own
step ``g - start_step`` (a pass over its train rows is ``end - start`` steps).

As the checkpoint's ``data`` entry it holds the index, the two steps, a sha256
of the names of the partitions up to the current one (so a resume onto a
manifest whose history changed is refused) and the partition's own fingerprint.
Every entry has a fixed size, as DCP loads into this run's tensors.

Tables never change size: every partition must have the first one's features
and table rows (``data.table_rows`` is a fixed capacity for a partitioned
dataset; trainer/prepare/partitions.py), or :meth:`open` refuses it, naming the
feature.

Example::

    stream = PartitionStream(cfg.data, seed=0)
    stream.refresh()                 # the manifest's partitions
    stream.open(0)
    stream.begin(start_step=0, end_step=100)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torchrec.datasets.utils import Batch

from trainer.data.data_configs import PreparedDataConfig
from trainer.data.partitions import Manifest, is_partitioned
from trainer.data.shards import ShardSource
from trainer.data.source import FeatureSpec

NOT_BEGUN = -1


class PartitionStream:
    """The partitions of ``data.dir``; ``seed``: the shuffle's when ``data.seed`` is unset."""

    def __init__(self, data: PreparedDataConfig, *, seed: int) -> None:
        self.data = data
        self.directory = Path(data.dir).expanduser()
        self.seed = data.seed if data.seed is not None else seed
        self.names: list[str] = []  # the manifest's partitions, as last read
        self.paths: list[str] = []
        self.index = 0
        self.start_step = NOT_BEGUN  # the current partition's global steps
        self.end_step = NOT_BEGUN
        self.current: ShardSource | None = None
        self._features: list[FeatureSpec] | None = None  # the first partition's: the model's
        self._num_dense = 0

    def refresh(self) -> list[str]:
        """Reads the manifest; returns (and keeps) its partition names in order."""
        if not is_partitioned(self.directory):
            self.names, self.paths = [], []
            return []
        manifest = Manifest.read(self.directory)
        self.names = manifest.names
        self.paths = [p.path for p in manifest.partitions]
        return self.names

    @property
    def begun(self) -> bool:
        return self.end_step != NOT_BEGUN

    @property
    def name(self) -> str:
        return self.names[self.index]

    def consumed(self, step: int) -> list[str]:
        """The partitions trained to their end by global step ``step``, in order."""
        if not self.begun:
            return []
        return self.names[: self.index + (step >= self.end_step)]

    def open(self, index: int) -> None:
        """Reads partition ``index`` from now on (not yet begun)."""
        d = self.data
        source = ShardSource(
            self.directory / self.paths[index],
            seed=self.seed,
            shuffle=d.shuffle,
            eval_fraction=d.eval_fraction,
            check_ids=d.check_ids,
            dense_norm=str(d.dense_norm),
            allow_empty_split=True,  # a quiet partition: trained or evaluated only (follow.py)
        )
        if self._features is None:
            self._features, self._num_dense = list(source.features), source.num_dense
        self._check_tables(source, self.names[index])
        self.current, self.index = source, index
        self.start_step = self.end_step = NOT_BEGUN

    def begin(self, *, start_step: int, end_step: int) -> None:
        """The current partition trains global steps ``[start_step, end_step)``."""
        self.start_step, self.end_step = start_step, end_step

    def _check_tables(self, source: ShardSource, name: str) -> None:
        assert self._features is not None
        want = {f.name: f.num_embeddings for f in self._features}
        have = {f.name: f.num_embeddings for f in source.features}
        if set(want) != set(have) or source.num_dense != self._num_dense:
            raise ValueError(
                f"partition {name} of {self.directory} has features {sorted(have)} and "
                f"{source.num_dense} dense columns, the model {sorted(want)}; every partition "
                "of a dataset has the same columns (prepare it with the dataset's settings)"
            )
        for feature, rows in have.items():
            if rows != want[feature]:
                raise ValueError(
                    f"partition {name}: feature {feature!r}'s table has {rows} rows, the model's "
                    f"{want[feature]} (from the first partition); follow mode does not resize "
                    "tables: prepare the dataset with a fixed capacity, data.table_rows=N > 0 "
                    "(ids past it share the out-of-vocabulary row)"
                )

    # The DataSource protocol ------------------------------------------------------

    @property
    def source(self) -> ShardSource:
        assert self.current is not None, "no partition open"
        return self.current

    @property
    def features(self) -> list[FeatureSpec]:
        assert self._features is not None, "no partition open"
        return self._features

    @property
    def num_dense(self) -> int:
        return self.source.num_dense

    @property
    def num_eval_samples(self) -> int:
        return self.source.num_eval_samples

    @property
    def num_train_samples(self) -> int:
        return self.source.num_train_samples

    def train_batches(
        self, *, batch_size: int, rank: int, world_size: int, first_step: int, num_steps: int
    ) -> Iterator[Batch]:
        """The current partition's batches at the job's global steps."""
        assert self.begun and first_step >= self.start_step, (first_step, self.start_step)
        return self.source.train_batches(
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            first_step=first_step - self.start_step,
            num_steps=num_steps,
        )

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        return self.source.eval_batches(batch_size=batch_size, rank=rank, world_size=world_size)

    def reference_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.source.state_dict(),
            "partition": torch.tensor(self.index, dtype=torch.int64),
            "partition_start_step": torch.tensor(self.start_step, dtype=torch.int64),
            "partition_end_step": torch.tensor(self.end_step, dtype=torch.int64),
            "partitions_sha256": _text(_history(self.names[: self.index + 1])),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Opens the checkpoint's partition (checking the manifest's history and the
        partition's fingerprint) and its steps."""
        if "partition" not in state:
            raise ValueError(
                "the checkpoint holds no partition (it was not written by a follow job); "
                "resume a follow job from its own run directory, or trainer.resume=null"
            )
        index = int(state["partition"])
        saved = bytes(state["partitions_sha256"].tolist()).decode()
        names = self.refresh()
        if index >= len(names) or _history(names[: index + 1]) != saved:
            raise ValueError(
                f"the checkpoint was trained on partition {index} of {self.directory}, whose "
                f"manifest now lists {names[: index + 1]} up to it in another order or with "
                "others; partitions are append-only: resume on the dataset it was trained on"
            )
        self.open(index)
        self.source.load_state_dict(state)
        self.begin(
            start_step=int(state["partition_start_step"]),
            end_step=int(state["partition_end_step"]),
        )


def _history(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _text(value: str) -> torch.Tensor:
    return torch.tensor(list(value.encode()), dtype=torch.uint8)
