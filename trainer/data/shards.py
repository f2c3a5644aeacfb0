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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.loader import _check_rank, eval_slices
from trainer.data.shard_format import (
    DENSE_FILE,
    LABELS_FILE,
    ShardMetadata,
    offsets_file,
    values_file,
)
from trainer.data.source import FeatureSpec

PREPARE_HINT = "run python -m trainer.prepare"
# Elements per chunk when scanning the id arrays on open (bounded memory).
_SCAN_CHUNK = 1 << 24


@dataclass
class _Part:
    """One part's memory-mapped arrays: rows ``[start, start + num_rows)`` of its split."""

    path: Path
    start: int
    num_rows: int
    labels: np.ndarray
    dense: np.ndarray
    # Per feature, int64 [num_rows + 1]; None: exactly one id per sample (offsets 0..n).
    offsets: list[np.ndarray | None]
    values: list[np.ndarray]  # per feature


class _Rows:
    """Rows of a split (all its parts, one cumulative row index) that batches gather from."""

    def __init__(self, parts: list[_Part], num_features: int, num_dense: int) -> None:
        self.parts = parts
        self.num_features = num_features
        self.num_dense = num_dense
        self.starts = np.array([p.start for p in parts] + [_end(parts)], dtype=np.int64)

    def contiguous(self, begin: int, end: int) -> _Arrays:
        """Rows ``[begin, end)``: slices of each part they touch."""
        pieces = []
        for i in self._parts_between(begin, end):
            part = self.parts[i]
            lo, hi = max(begin - part.start, 0), min(end - part.start, part.num_rows)
            lengths = [None if off is None else np.diff(off[lo : hi + 1]) for off in part.offsets]
            values = [
                val[lo:hi] if off is None else val[off[lo] : off[hi]]
                for off, val in zip(part.offsets, part.values, strict=True)
            ]
            pieces.append(_Arrays(part.labels[lo:hi], part.dense[lo:hi], lengths, values))
        return _Arrays.concat(pieces, self.num_features, self.num_dense)

    def gather(self, rows: np.ndarray) -> _Arrays:
        """Rows ``rows`` (any order) in that order: sorted gathers from the maps, then reordered."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.searchsorted(sorted_rows, self.starts)
        pieces = []
        for i, part in enumerate(self.parts):
            if bounds[i] == bounds[i + 1]:
                continue
            local = sorted_rows[bounds[i] : bounds[i + 1]] - part.start
            lengths, values = [], []
            for off, val in zip(part.offsets, part.values, strict=True):
                if off is None:  # single-hot: the id of sample i is values[i]
                    lengths.append(None)
                    values.append(val[local])
                    continue
                begins = off[local]
                lengths.append(off[local + 1] - begins)
                values.append(val[_positions(begins, lengths[-1])])
            pieces.append(_Arrays(part.labels[local], part.dense[local], lengths, values))
        in_sorted_order = _Arrays.concat(pieces, self.num_features, self.num_dense)
        return in_sorted_order.take(np.argsort(order))

    def _parts_between(self, begin: int, end: int) -> range:
        first = int(np.searchsorted(self.starts, begin, side="right")) - 1
        last = int(np.searchsorted(self.starts, end, side="left"))
        return range(max(first, 0), min(last, len(self.parts)))


@dataclass
class _Arrays:
    """A batch as numpy arrays; lengths and values per feature."""

    labels: np.ndarray
    dense: np.ndarray
    lengths: list[np.ndarray | None]  # None: one id per sample
    values: list[np.ndarray]

    @staticmethod
    def concat(pieces: list[_Arrays], num_features: int, num_dense: int) -> _Arrays:
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            empty = np.zeros(0, dtype=np.int64)
            return _Arrays(
                np.zeros(0, np.float32),
                np.zeros((0, num_dense), np.float32),
                [empty] * num_features,
                [empty] * num_features,
            )
        return _Arrays(
            np.concatenate([p.labels for p in pieces]),
            np.concatenate([p.dense for p in pieces]),
            [_concat_lengths(pieces, f) for f in range(num_features)],
            [np.concatenate(x) for x in zip(*(p.values for p in pieces), strict=True)],
        )

    def take(self, rows: np.ndarray) -> _Arrays:
        """Rows ``rows`` of this (in-memory) batch."""
        values = []
        for lengths, vals in zip(self.lengths, self.values, strict=True):
            if lengths is None:
                values.append(vals[rows])
                continue
            begins = np.cumsum(lengths) - lengths
            values.append(vals[_positions(begins[rows], lengths[rows])])
        lengths = [None if n is None else n[rows] for n in self.lengths]
        return _Arrays(self.labels[rows], self.dense[rows], lengths, values)

    def to_batch(self, keys: list[str]) -> Batch:
        num_samples = self.labels.shape[0]
        lengths = np.concatenate(
            [
                np.ones(num_samples, np.int32) if n is None else n.astype(np.int32)
                for n in self.lengths
            ]
        )
        lengths = torch.from_numpy(lengths)
        values = torch.from_numpy(np.concatenate(self.values).astype(np.int64))
        return Batch(
            # np.array copies: the batch must not keep (read-only) pages of the maps.
            dense_features=torch.from_numpy(np.array(self.dense, dtype=np.float32)),
            # torchrec's layout: feature-major (all of feature 0's bags, then 1's ...).
            sparse_features=KeyedJaggedTensor.from_lengths_sync(
                keys=keys, values=values, lengths=lengths
            ),
            labels=torch.from_numpy(np.array(self.labels, dtype=np.float32)),
        )


class ShardSource:
    """Batches from a prepared data directory (see the module docstring).

    ``eval_fraction`` applies only when the directory has no ``eval`` split.
    ``check_ids`` scans every id array once on open (a few seconds per billion
    ids) so that ids outside a table fail here, naming the file, and not as a
    wrong embedding lookup later.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        seed: int,
        shuffle: bool = True,
        eval_fraction: float = 0.05,
        check_ids: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.meta = ShardMetadata.read(self.directory)
        self.seed = seed
        self.shuffle = shuffle
        self.features: list[FeatureSpec] = list(self.meta.features)
        self.num_dense: int = self.meta.num_dense
        self._keys = [f.name for f in self.features]
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
        if self._train_rows < 1 or self.num_eval_samples < 1:
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
            yield self._train_arrays(begin, begin + batch_size).to_batch(self._keys)

    def eval_batches(self, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's share of the eval rows, in order; the same batch count on every rank."""
        for start, size in eval_slices(
            self.num_eval_samples, batch_size=batch_size, rank=rank, world_size=world_size
        ):
            begin = self._eval_offset + start
            yield self._eval.contiguous(begin, begin + size).to_batch(self._keys)

    def reference_metrics(self) -> dict[str, float]:
        return {}  # real data: no known best AUC

    def state_dict(self) -> dict[str, Any]:
        """The position is the trainer's step; this pins the data the step indexes.

        Tensors only (text as uint8 bytes), as every checkpoint entry: loading never
        unpickles.
        """
        return {k: _to_tensor(v) for k, v in self._stream().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ``ValueError`` when the checkpoint's stream is not this one."""
        mine = self._stream()
        saved = {k: _from_tensor(state[k], type(mine[k])) if k in state else None for k in mine}
        if (saved["fingerprint"], saved["checksum"]) != (mine["fingerprint"], mine["checksum"]):
            raise ValueError(
                f"{self.directory} holds shards from a different prepare config than the run: "
                f"checkpoint fingerprint {saved['fingerprint']!r} checksum "
                f"{saved['checksum']!r}, data fingerprint {mine['fingerprint']!r} checksum "
                f"{mine['checksum']!r}; point data.dir at the data the run was trained on"
            )
        changed = [k for k in ("num_train_samples", "seed", "shuffle") if saved[k] != mine[k]]
        if changed:
            diff = ", ".join(f"{k}: checkpoint {saved[k]!r}, now {mine[k]!r}" for k in changed)
            raise ValueError(
                f"the run's training order changed since the checkpoint ({diff}); "
                "resume with the settings it was saved with (seed, data.shuffle, "
                "data.eval_fraction)"
            )

    def _stream(self) -> dict[str, str | int | bool]:
        return {
            "fingerprint": self.meta.fingerprint,
            "checksum": self.meta.checksum,
            "num_train_samples": self._train_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def _train_arrays(self, begin: int, end: int) -> _Arrays:
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

    def _open_split(self, split: str, *, check_ids: bool) -> _Rows:
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
        return _Rows(parts, len(self.features), self.num_dense)

    def _open_part(self, path: Path, start: int, num_rows: int) -> _Part:
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
        return _Part(path, start, num_rows, labels, dense, offsets, values)

    def _check_ids(self, part: _Part) -> None:
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


def _concat_lengths(pieces: list[_Arrays], feature: int) -> np.ndarray | None:
    lengths = [p.lengths[feature] for p in pieces]
    if all(n is None for n in lengths):
        return None
    return np.concatenate(
        [np.ones(len(p.labels), np.int64) if n is None else n for p, n in zip(pieces, lengths)]
    )


def _positions(begins: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the bags ``[begins[i], begins[i] + lengths[i])``, concatenated."""
    out_begins = np.cumsum(lengths) - lengths
    return np.repeat(begins - out_begins, lengths) + np.arange(int(lengths.sum()))


def _end(parts: list[_Part]) -> int:
    return parts[-1].start + parts[-1].num_rows if parts else 0
