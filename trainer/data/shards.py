"""Training from prepared shards: a memory-mapped :class:`DataSource`.

``python -m trainer.prepare`` writes a data directory once (layout in
:mod:`trainer.data.shard_format`); :class:`ShardSource` maps its arrays
(``np.load(mmap_mode="r")``) and builds torchrec ``Batch``es from them with
numpy slicing and gathers only, never a Python loop over samples. The features
(tables, pooling factors) and the dense width come from ``metadata.json``.

The training stream. The train split's ``N`` rows are read epoch after epoch,
each epoch in its own order: a permutation of the rows drawn from
``(seed, epoch)`` (or ``0 .. N-1`` with ``shuffle=False``). Concatenated, the
epochs form one endless stream, and global step ``s`` covers stream positions
``[s * B * W, (s + 1) * B * W)`` (``B`` per-rank batch, ``W`` world size), of
which rank ``r`` reads the block ``[r * B, (r + 1) * B)``. So:

- no partial batch is dropped: a step whose positions cross an epoch's end
  takes the last rows of epoch ``e`` and the first of epoch ``e + 1``
  (position ``p`` is row ``perm_e[p % N]`` with ``e = p // N``);
- the step alone is the position: a resumed run passing ``first_step=k`` gets
  exactly the batches the uninterrupted run had from step ``k``, and the
  stream does not depend on ``W`` (only on ``B * W``'s blocking of it).

Worked example: ``N = 10``, ``B = 2``, ``W = 2``: step 0 is positions 0-3
(rank 0 reads 0-1, rank 1 reads 2-3), step 2 is positions 8-11, that is rows
``perm_0[8], perm_0[9]`` for rank 0 and ``perm_1[0], perm_1[1]`` for rank 1.

The eval split is the prepared ``eval`` split when there is one; otherwise
the last ``eval_fraction`` of the train split's rows, which are then never
part of the training stream. Evaluation reads it in order, sliced per rank as
:func:`trainer.data.loader.eval_slices` says (the same number of batches on
every rank).

Example::

    source = ShardSource(Path("data/criteo"), seed=0, eval_fraction=0.05)
    [f.name for f in source.features]      # from metadata.json
    for batch in source.train_batches(batch_size=1024, rank=0, world_size=2,
                                      first_step=0, num_steps=100):
        ...                                # torchrec Batch
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from trainer.data.loader import _check_rank, eval_slices
from trainer.data.shard_format import (
    DENSE_FILE,
    LABELS_FILE,
    ShardMetadata,
    offsets_file,
    values_file,
)
from trainer.data.shard_rows import Arrays, Part, Rows
from trainer.data.source import FeatureSpec

PREPARE_HINT = "run python -m trainer.prepare"
# A column whose train std is below this (constant) is only centred, not scaled.
MIN_DENSE_STD = 1e-6
# Elements per chunk when scanning the id arrays on open (bounded memory).
_SCAN_CHUNK = 1 << 24


class ShardSource:
    """Batches from a prepared data directory (see the module docstring).

    ``eval_fraction`` applies only when the directory has no ``eval`` split.
    ``check_ids`` scans every id array once on open (a few seconds per billion
    ids) so that ids outside a table fail here, naming the file, and not as a
    wrong embedding lookup later. ``dense_norm="standardize"`` turns each dense
    column into ``(x - mean) / std`` with the train split's statistics from
    ``metadata.json`` (train and eval batches alike; a constant column, std
    below ``MIN_DENSE_STD``, is only centred); ``"none"`` gives the stored values.
    Both splits need a row, except with ``allow_empty_split`` (follow mode's
    partitions: a quiet hour may have no eval row, or no train row).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        seed: int,
        shuffle: bool = True,
        eval_fraction: float = 0.05,
        check_ids: bool = True,
        dense_norm: str = "standardize",
        allow_empty_split: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.meta = ShardMetadata.read(self.directory)
        self.seed = seed
        self.shuffle = shuffle
        self.features: list[FeatureSpec] = list(self.meta.features)
        self.num_dense: int = self.meta.num_dense
        self._keys = [f.name for f in self.features]
        self.dense_norm = str(dense_norm)
        self._norm = self._dense_norm_arrays()
        train = self._open_split("train", check_ids=check_ids)
        if "eval" in self.meta.splits and self.meta.splits["eval"].num_rows > 0:
            self.eval_fraction = 0.0
            self._train_rows = train.starts[-1]
            self._eval = self._open_split("eval", check_ids=check_ids)
            self._eval_offset = 0
        else:
            if not 0.0 < eval_fraction < 1.0:
                raise ValueError(
                    f"{self.directory} has no eval split, so data.eval_fraction={eval_fraction} "
                    "must be in (0, 1): that share of the rows, at the end, is held out; "
                    "or prepare an eval split with data.eval_raw=[...]"
                )
            self.eval_fraction = eval_fraction
            num_eval = int(round(train.starts[-1] * eval_fraction))
            self._train_rows = train.starts[-1] - num_eval
            self._eval, self._eval_offset = train, int(self._train_rows)
        self._train_rows = int(self._train_rows)
        self.num_eval_samples: int = int(self._eval.starts[-1]) - self._eval_offset
        if not allow_empty_split and (self._train_rows < 1 or self.num_eval_samples < 1):
            raise ValueError(
                f"{self.directory}: {self._train_rows} train and {self.num_eval_samples} eval "
                "rows; both splits need at least one row (more data or another eval_fraction)"
            )
        self._train = train
        self._permutations: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int | None = None) -> ShardSource:
        """From a ``data=criteo`` / ``data=table`` config (``trainer.data.data_configs``):
        ``data.dir``, ``data.shuffle``, ``data.eval_fraction``, ``data.check_ids`` and
        the shuffle seed ``data.seed``, else ``seed`` (the trainer's), else 0."""
        if not cfg.dir:
            raise ValueError(
                f"data.dir is empty: data={cfg.name} trains from a directory written by "
                f"`python -m trainer.prepare data={cfg.name} 'data.raw=[...]' data.dir=DIR`; "
                "pass data.dir=DIR"
            )
        shuffle_seed = cfg.seed if cfg.seed is not None else seed
        return cls(
            Path(cfg.dir),
            seed=0 if shuffle_seed is None else shuffle_seed,
            shuffle=cfg.shuffle,
            eval_fraction=cfg.eval_fraction,
            check_ids=cfg.check_ids,
            dense_norm=str(getattr(cfg, "dense_norm", "standardize")),
        )

    @property
    def num_train_samples(self) -> int:
        """Rows in one training epoch (the eval rows held out of the train split excluded)."""
        return self._train_rows

    def train_batches(
        self, *, batch_size: int, rank: int, world_size: int, first_step: int, num_steps: int
    ) -> Iterator[Batch]:
        """This rank's batches for global steps ``first_step .. first_step + num_steps - 1``."""
        _check_rank(rank, world_size, batch_size)
        for step in range(first_step, first_step + num_steps):
            begin = (step * world_size + rank) * batch_size
            arrays = self._train_arrays(begin, begin + batch_size)
            yield arrays.to_batch(self._keys, dense_norm=self._norm)

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's share of the eval rows, in order; the same batch count on every rank."""
        for start, size in eval_slices(
            self.num_eval_samples, batch_size=batch_size, rank=rank, world_size=world_size
        ):
            begin = self._eval_offset + start
            arrays = self._eval.contiguous(begin, begin + size)
            yield arrays.to_batch(self._keys, dense_norm=self._norm)  # the train split's stats

    def reference_metrics(self) -> dict[str, float]:
        return {}  # real data: no known best AUC

    def state_dict(self) -> dict[str, Any]:
        """The position is the trainer's step; this pins the data the step indexes.

        Tensors only (text as uint8 bytes), as every checkpoint entry: loading never
        unpickles.
        """
        return {k: _to_tensor(v) for k, v in self._stream().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ``ValueError`` when the checkpoint's stream is not this one.

        The rows are pinned by the prepare fingerprint (the settings that shape the
        rows and the inputs' path, size and mtime), not by the checksum: the same
        rows prepared with another ``data.chunk_bytes`` are cut into other parts,
        so their files (and checksum) differ while every row is the same."""
        mine = self._stream()
        saved = {k: _from_tensor(state[k], type(mine[k])) if k in state else None for k in mine}
        if saved["fingerprint"] != mine["fingerprint"]:
            raise ValueError(
                f"{self.directory} holds shards from a different prepare config or other "
                f"inputs than the run: checkpoint fingerprint {saved['fingerprint']!r}, data "
                f"fingerprint {mine['fingerprint']!r}; point data.dir at the data the run was "
                "trained on (or prepare it again with the same settings and files)"
            )
        # dense_norm: absent from checkpoints written before it existed.
        keys = ("num_train_samples", "seed", "shuffle", "dense_norm")
        changed = [k for k in keys if saved[k] is not None and saved[k] != mine[k]]
        if changed:
            diff = ", ".join(f"{k}: checkpoint {saved[k]!r}, now {mine[k]!r}" for k in changed)
            raise ValueError(
                f"the run's training order changed since the checkpoint ({diff}); "
                "resume with the settings it was saved with (seed, data.shuffle, "
                "data.eval_fraction, data.dense_norm)"
            )

    def _stream(self) -> dict[str, str | int | bool]:
        return {
            "fingerprint": self.meta.fingerprint,
            "checksum": self.meta.checksum,
            "num_train_samples": self._train_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dense_norm": self.dense_norm,
        }

    def _dense_norm_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, 1 / std)`` as float32 per column, or None for ``dense_norm="none"``."""
        if self.dense_norm == "none" or self.num_dense == 0:
            return None
        if self.dense_norm != "standardize":
            raise ValueError(f"data.dense_norm={self.dense_norm!r}: use standardize or none")
        stats = self.meta.dense_stats
        mean = np.asarray(stats.get("mean", []), dtype=np.float64)
        std = np.asarray(stats.get("std", []), dtype=np.float64)
        if mean.shape != (self.num_dense,) or std.shape != (self.num_dense,):
            raise ValueError(
                f"{self.directory / 'metadata.json'} has no dense_stats for its "
                f"{self.num_dense} dense columns (written by an older prepare); {PREPARE_HINT} "
                "again, or pass data.dense_norm=none to train on the stored values"
            )
        scale = 1.0 / np.where(std < MIN_DENSE_STD, 1.0, std)
        return mean.astype(np.float32), scale.astype(np.float32)

    def _train_arrays(self, begin: int, end: int) -> Arrays:
        """Stream positions ``[begin, end)`` (see the module docstring)."""
        n = self._train_rows
        first_epoch, last_epoch = begin // n, (end - 1) // n
        if not self.shuffle and first_epoch == last_epoch:
            return self._train.contiguous(begin - first_epoch * n, end - first_epoch * n)
        positions = np.arange(begin, end, dtype=np.int64)
        epochs, within = np.divmod(positions, n)
        rows = np.empty_like(positions)
        for epoch in range(first_epoch, last_epoch + 1):
            mask = epochs == epoch
            rows[mask] = self._order(epoch)[within[mask]] if self.shuffle else within[mask]
        return self._train.gather(rows)

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of the train rows, a function of (seed, epoch)."""
        if epoch not in self._permutations:
            # Keep the two newest: a step spans at most two epochs when B * W <= N.
            for old in sorted(self._permutations)[:-1]:
                del self._permutations[old]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            dtype = np.int32 if self._train_rows < 2**31 else np.int64
            self._permutations[epoch] = rng.permutation(self._train_rows).astype(dtype)
        return self._permutations[epoch]

    def _open_split(self, split: str, *, check_ids: bool) -> Rows:
        info = self.meta.splits.get(split)
        if info is None or not info.parts:
            raise FileNotFoundError(
                f"{self.directory / 'metadata.json'} lists no {split!r} parts; {PREPARE_HINT} "
                f"to write {self.directory}"
            )
        parts, start = [], 0
        for part_info in info.parts:
            part = self._open_part(self.directory / part_info.path, start, part_info.num_rows)
            if check_ids:
                self._check_ids(part)
            parts.append(part)
            start += part.num_rows
        if start != info.num_rows:
            raise ValueError(
                f"{self.directory / 'metadata.json'}: split {split!r} says {info.num_rows} rows "
                f"but its parts hold {start}; the directory is inconsistent, {PREPARE_HINT} again"
            )
        return Rows(parts, len(self.features), self.num_dense)

    def _open_part(self, path: Path, start: int, num_rows: int) -> Part:
        labels = _load(path / LABELS_FILE, (num_rows,))
        dense = _load(path / DENSE_FILE, (num_rows, self.num_dense))
        offsets, values = [], []
        for spec in self.features:
            feature = spec.name
            off = _load(path / offsets_file(feature), (num_rows + 1,))
            val = _load(path / values_file(feature), None)
            if val.ndim != 1 or off[0] != 0 or off[-1] != val.shape[0]:
                raise ValueError(
                    f"{path / offsets_file(feature)} ends at {off[-1]} (starts at {off[0]}) but "
                    f"{path / values_file(feature)} holds {val.shape} ids; the part is "
                    f"corrupt, {PREPARE_HINT} again"
                )
            # One id per sample (the common case): gathers skip the offsets.
            single_hot = spec.max_ids_per_sample <= 1 and off[-1] == num_rows
            offsets.append(None if single_hot else off)
            values.append(val)
        return Part(path, start, num_rows, labels, dense, offsets, values)

    def _check_ids(self, part: Part) -> None:
        for spec, val in zip(self.features, part.values, strict=True):
            for lo in range(0, val.shape[0], _SCAN_CHUNK):
                chunk = val[lo : lo + _SCAN_CHUNK]
                low, high = int(chunk.min()), int(chunk.max())
                if low < 0 or high >= spec.num_embeddings:
                    bad = low if low < 0 else high
                    raise ValueError(
                        f"{part.path / values_file(spec.name)} has id {bad}, outside feature "
                        f"{spec.name!r}'s table of {spec.num_embeddings} rows (metadata.json); "
                        f"the shards do not match their metadata, {PREPARE_HINT} again"
                    )


def _load(path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the prepared data directory is incomplete; {PREPARE_HINT} again"
        )
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable .npy array ({e}); {PREPARE_HINT} again") from e
    if shape is not None and array.shape != shape:
        raise ValueError(
            f"{path} has shape {array.shape}, expected {shape} from metadata.json; "
            f"{PREPARE_HINT} again"
        )
    # A plain ndarray view: np.memmap's __getitem__ costs more than the gathers themselves.
    return array.view(np.ndarray)


def _to_tensor(value: str | int | bool) -> torch.Tensor:
    if isinstance(value, str):
        return torch.tensor(list(value.encode()), dtype=torch.uint8)
    return torch.tensor(int(value), dtype=torch.int64)


def _from_tensor(value: Any, kind: type) -> str | int | bool:
    if not isinstance(value, torch.Tensor):
        return value
    if kind is str:
        return bytes(value.tolist()).decode()
    return kind(value.item())
