"""A hashed or managed-collision model resumes only in the id layout it trained with.

Under ``model.id_management=hash`` or ``managed_collision`` (trainer/models/collision.py)
a model sharded row-wise over W ranks cuts the raw id range into W blocks, and
rank b remaps block b's ids into its own rows ``[starts[b], starts[b + 1])``:
``hash`` reads ``starts[b] + id % rows_b``, and a managed-collision rank keeps its
own map whose misses read ``starts[b + 1] - 1``. The rule is a function of the
layout, so a checkpoint of W blocks loaded into another layout (one process
reads ``id % rows`` and the table's last row for a miss) scores ids against other
rows. The checkpoint records the layout (each table's saved row shards, as the
offline export reads it: trainer/export/stream.py ``checkpoint_tables``), and
:func:`check_id_layout` refuses a resume into a different one before anything
is read. ``python -m trainer.export`` serves such a checkpoint with its own
layout, on one process.

A faithful resume onto fewer ranks would need W independent maps (admission and
eviction per block) inside one rank, which torchrec's module does not offer.

Example::

    check_id_layout(path, template, metadata)     # in load_checkpoint, before dcp.load
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from trainer.errors import ConfigError

_REMAP = re.compile(r"^(.*)\._managed_collision_collection\._managed_collision_modules\.(\w+)\.")


def _row_starts(value: Any) -> list[int]:
    """The first row of each shard of a table this run holds (one block: ``[0]``)."""
    if isinstance(value, ShardedTensor):
        return sorted({m.shard_offsets[0] for m in value.metadata().shards_metadata})
    return [0]


def check_id_layout(path: Path, template: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Raises ConfigError when an id-managed table's row blocks in this run (``template``:
    the state dicts to load into) differ from the checkpoint's (``metadata``: DCP's
    ``state_dict_metadata``)."""
    flat, _ = flatten_state_dict(template)
    tables: dict[str, str] = {}  # table -> its weight's key
    kinds: dict[str, str] = {}
    for key in flat:
        match = _REMAP.match(key)
        if match is None:
            continue
        prefix, table = match.groups()
        tables[table] = f"{prefix}._embedding_module.embedding_bags.{table}.weight"
        if key.endswith("._mch_sorted_raw_ids"):
            kinds[table] = "managed_collision"
    for table, key in tables.items():
        if key not in flat or key not in metadata:
            continue  # another model: _check_same_layout names what is missing
        chunks = getattr(metadata[key], "chunks", [])
        saved = sorted({c.offsets[0] for c in chunks} | {0})
        here = _row_starts(flat[key])
        if saved == here:
            continue
        rows = list(metadata[key].size)[0]
        kind = kinds.get(table, "hash")
        raise ConfigError(
            f"trainer.resume={path}: model.id_management={kind} table {table} was trained "
            f"in {len(saved)} id blocks of rows {saved + [rows]} (one per rank, each "
            f"remapping its own block of the raw ids), this run's plan has "
            f"{len(here)} ({here + [rows]}), where ids would read other rows; resume on "
            f"{len(saved)} ranks with sharding=row_wise (torchrun --nproc_per_node="
            f"{len(saved)}), or serve it on one process with python -m trainer.export {path}"
        )
