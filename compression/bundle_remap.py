"""The served program's id remap: raw ids to table rows, as the trained model did it.

A table under ``model.id_management=hash`` or ``managed_collision`` is smaller
than its id space; training put a torchrec managed-collision module in front of
it (trainer/models/collision.py). :class:`IdRemap` does the same remap in front
of the served program's lookups (compression/bundle.py), with plain aten ops
(``searchsorted``, ``where``, indexing), so the program takes the raw ids a
training batch carries.

Sharded over W ranks, torchrec cuts a table's raw id range ``[0, input_size)``
into W blocks of ``block = ceil(input_size / W)`` ids (FBGEMM's
``block_bucketize_sparse_features``: id ``i`` goes to block ``i // block``, an id
past the last block to block ``i % W``), and the rank of block ``b`` owns rows
``[starts[b], starts[b + 1])`` (``row_blocks``; one block unsharded):

- ``hash``: row = ``starts[b] + i % (starts[b + 1] - starts[b])`` (one block: ``i % rows``);
- ``managed_collision``: the map's row of ``i`` (every rank's map merged: each
  holds only its block's ids, and global rows); an id not in the map reads its
  block's last row, ``starts[b + 1] - 1`` (one block: the table's last row, the
  miss row), as torchrec's ``MCHManagedCollisionModule`` does in eval.

Every managed-collision table's mapped ids are one sorted buffer (``keys``):
table ``t``'s id ``i`` is the key ``base[t] + i - lo[t]``, with ``[lo[t], lo[t] +
span[t])`` the range of its mapped ids, so one ``searchsorted`` serves all
features; an id outside its table's range is a miss without a lookup.

Example::

    remap = IdRemap({"t_cat_0": TableRemap("managed_collision", [0, 1000], 5000, ids, rows)},
                    feature_tables={"cat_0": "t_cat_0"}, feature_names=["cat_0"])
    rows = remap(ids, lengths)        # int64[N], the rows the packed tables read
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

KINDS = ("direct", "hash", "managed_collision")
# torchrec's empty map slot.
EMPTY_ID = torch.iinfo(torch.int64).max


@dataclass
class TableRemap:
    """One table's remap. ``row_blocks``: the first row of each rank's block of rows, then
    the table's rows (``[0, rows]`` unsharded); ``input_size``: the raw id range cut into
    those blocks; ``ids`` / ``rows``: a managed-collision table's map (raw id -> global
    row, any order; torchrec's empty slots are dropped)."""

    kind: str
    row_blocks: list[int]
    input_size: int
    ids: Tensor | None = None
    rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"id management {self.kind!r}: use one of {KINDS}")
        if len(self.row_blocks) < 2 or sorted(self.row_blocks) != list(self.row_blocks):
            raise ValueError(f"row_blocks {self.row_blocks}: block starts, then the rows")
        if self.kind == "managed_collision":
            if self.ids is None or self.rows is None or self.ids.shape != self.rows.shape:
                raise ValueError("a managed-collision table needs its map: ids and rows")
            used = self.ids != EMPTY_ID
            order = torch.argsort(self.ids[used])
            self.ids = self.ids[used][order].long()
            self.rows = self.rows[used][order].long()

    @property
    def num_blocks(self) -> int:
        return len(self.row_blocks) - 1

    def describe(self) -> dict[str, Any]:
        """This table's entry in schema.json (``id_management`` of its features)."""
        rows = self.row_blocks[-1]
        out: dict[str, Any] = {"kind": self.kind, "rows": rows}
        if self.kind == "direct":
            return out
        out["input_size"] = self.input_size
        if self.num_blocks == 1:
            out["row"] = (
                "id % rows"
                if self.kind == "hash"
                else "the map's row of id; an id not in the map reads miss_row"
            )
        else:  # trained on W ranks: the remap of each rank's block
            out["blocks"] = {
                "count": self.num_blocks,
                "ids_per_block": -(-self.input_size // self.num_blocks),
                "row_starts": list(self.row_blocks),
                "block": "id // ids_per_block, an id past the last block: id % count",
            }
            out["row"] = (
                "row_starts[b] + id % (row_starts[b + 1] - row_starts[b]) for id's block b"
                if self.kind == "hash"
                else "the map's row of id; an id not in the map reads row_starts[b + 1] - 1 "
                "for its block b"
            )
        if self.kind == "managed_collision":
            assert self.ids is not None
            out["map_size"] = int(self.ids.numel())
            out["miss_row"] = rows - 1 if self.num_blocks == 1 else None
        return out


class IdRemap(nn.Module):
    """``(ids, lengths) -> rows``: each feature's raw ids remapped as its table's
    :class:`TableRemap` says (features of tables without one keep their ids).

    Buffers only, per feature in input order: ``kind`` (0 direct, 1 hash, 2 managed
    collision), ``block`` and ``num_blocks`` (the raw id blocks), ``row_starts``
    (``[F, W + 1]``), ``key_base`` / ``key_lo`` / ``key_span`` (its table's range in
    ``keys``); ``keys`` / ``key_rows``: every map, sorted, and the rows.
    """

    def __init__(
        self,
        remaps: dict[str, TableRemap],
        *,
        feature_tables: dict[str, str],
        feature_names: list[str],
    ) -> None:
        super().__init__()
        blocks = {r.num_blocks for r in remaps.values()}
        if len(blocks) > 1:
            raise ValueError(f"tables remapped over different numbers of blocks: {blocks}")
        num_blocks = blocks.pop() if blocks else 1
        self.feature_names = list(feature_names)
        self.tables = dict(remaps)
        self.feature_tables = {f: feature_tables[f] for f in feature_names}
        bases: dict[str, tuple[int, int, int]] = {}  # table -> (base, lo, span)
        keys, key_rows, base = [], [], 0
        for name, r in remaps.items():
            if r.kind != "managed_collision" or r.ids is None or r.ids.numel() == 0:
                continue
            lo, span = int(r.ids[0]), int(r.ids[-1]) - int(r.ids[0]) + 1
            if base + span >= EMPTY_ID:
                raise ValueError(f"table {name}: the mapped ids span too wide a range")
            keys.append(r.ids - lo + base)
            key_rows.append(r.rows)
            bases[name], base = (base, lo, span), base + span
        # One sentinel key: searchsorted always lands on an entry.
        keys.append(torch.tensor([EMPTY_ID]))
        key_rows.append(torch.tensor([-1]))
        self.register_buffer("keys", torch.cat(keys))
        self.register_buffer("key_rows", torch.cat(key_rows))
        per_feature = [remaps.get(self.feature_tables[f]) for f in feature_names]
        kinds = [KINDS.index(r.kind) if r else 0 for r in per_feature]
        sizes = [r.input_size if r else 0 for r in per_feature]
        starts = [r.row_blocks if r else [0] * (num_blocks + 1) for r in per_feature]
        spans = [bases.get(self.feature_tables[f], (0, 0, 0)) for f in feature_names]
        self.register_buffer("kind", torch.tensor(kinds, dtype=torch.int64))
        block = [max(-(-size // num_blocks), 1) for size in sizes]
        self.register_buffer("block", torch.tensor(block, dtype=torch.int64))
        self.register_buffer("num_blocks", torch.full((len(kinds),), num_blocks))
        self.register_buffer("row_starts", torch.tensor(starts, dtype=torch.int64))
        self.register_buffer("key_base", torch.tensor([s[0] for s in spans], dtype=torch.int64))
        self.register_buffer("key_lo", torch.tensor([s[1] for s in spans], dtype=torch.int64))
        self.register_buffer("key_span", torch.tensor([s[2] for s in spans], dtype=torch.int64))
        self.register_buffer("feature_index", torch.arange(len(kinds), dtype=torch.int64))

    def describe(self) -> list[dict[str, Any]]:
        """Per feature (input order): its table's ``id_management`` entry for schema.json."""
        direct = {"kind": "direct"}
        return [
            self.tables[t].describe() if t in self.tables else direct
            for t in (self.feature_tables[f] for f in self.feature_names)
        ]

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``int64[N]`` rows of the raw ``ids`` (feature-major; ``lengths``: ids per
        (feature, sample))."""
        batch = lengths.shape[0] // self.feature_index.shape[0]
        feature = self.feature_index.repeat_interleave(batch).repeat_interleave(
            lengths, output_size=ids.shape[0]
        )
        num_blocks = self.num_blocks[feature]
        block = self.block[feature]
        in_blocks = (ids >= 0) & (ids < block * num_blocks)
        bucket = torch.where(in_blocks, torch.div(ids, block, rounding_mode="floor"), 0)
        bucket = torch.where(in_blocks, bucket, ids.remainder(num_blocks))
        start = self.row_starts[feature, bucket]
        end = self.row_starts[feature, bucket + 1]
        hashed = start + ids.remainder((end - start).clamp(min=1))
        offset = ids - self.key_lo[feature]
        inside = (offset >= 0) & (offset < self.key_span[feature])
        key = self.key_base[feature] + offset.clamp(min=0)
        found = torch.searchsorted(self.keys, key).clamp(max=self.keys.shape[0] - 1)
        hit = inside & (self.keys[found] == key)
        mapped = torch.where(hit, self.key_rows[found], end - 1)
        kind = self.kind[feature]
        return torch.where(kind == 1, hashed, torch.where(kind == 2, mapped, ids))
