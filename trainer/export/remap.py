"""The id remap of a hashed or managed-collision model, for its serving program.

``model.id_management=hash`` / ``managed_collision`` (trainer/models/collision.py)
remaps raw ids to rows with a torchrec managed-collision module per table. The
export (trainer/export/step.py, stream.py) gathers each table's remap state with
its rows (a managed-collision map is row-wise sharded like its table), loads it
into the trained model on rank 0, and :func:`id_remap` reads the modules into
compression/bundle_remap.py's :class:`IdRemap`, which the program applies to the
raw ids before its lookups.

Example::

    kinds = remap_specs(meta_trained)          # table -> (kind, state keys)
    remap = id_remap(trained.model, row_blocks={"t_cat_0": [0, 150, 300]},
                     feature_names=["cat_0"])
"""

from __future__ import annotations

from torch import nn
from torchrec.modules.mc_modules import MCHManagedCollisionModule

from compression.bundle import UnsupportedModel
from compression.bundle_remap import IdRemap, TableRemap
from trainer.models.collision import IdManagedTables, ModuloCollisionModule


def _id_managed(model: nn.Module) -> IdManagedTables | None:
    """The model's managed-collision tables (DLRM's ``sparse_arch``), if any."""
    tables = getattr(getattr(model, "sparse_arch", None), "embedding_bag_collection", None)
    return tables if isinstance(tables, IdManagedTables) else None


def _kind(module: nn.Module, table: str) -> str:
    if isinstance(module, ModuloCollisionModule):
        return "hash"
    if isinstance(module, MCHManagedCollisionModule):
        return "managed_collision"
    raise UnsupportedModel(f"table {table}: no served remap for {type(module).__name__}")


def remap_specs(meta_trained: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per remapped table of the trained model (built on ``meta``): its id management and
    the state keys of its remap that are sharded like its rows (a map's ``_mch_*``)."""
    tables = _id_managed(getattr(meta_trained, "model", meta_trained))
    if tables is None:
        return {}
    names = {id(m): n for n, m in meta_trained.named_modules()}
    out = {}
    for table, module in tables.remap_modules().items():
        prefix = names[id(module)]
        keys = tuple(f"{prefix}.{k}" for k in module.state_dict() if k.startswith("_mch_"))
        out[table] = (_kind(module, table), keys)
    return out


def id_remap(
    model: nn.Module, *, row_blocks: dict[str, list[int]], feature_names: list[str]
) -> IdRemap | None:
    """The :class:`IdRemap` of ``model`` (a DLRM whose remap state is loaded, unsharded:
    every rank's map merged) for the row layout it trained with (``row_blocks``:
    per table, its ranks' first rows, then its rows); None when nothing is remapped."""
    tables = _id_managed(model)
    if tables is None:
        return None
    remaps = {}
    for table, m in tables.remap_modules().items():
        kind = _kind(m, table)
        mapped = {}
        if kind == "managed_collision":
            mapped = {"ids": m._mch_sorted_raw_ids, "rows": m._mch_remapped_ids_mapping}
        remaps[table] = TableRemap(kind, row_blocks[table], m.input_size(), **mapped)
    feature_tables = {f: c.name for c in tables.embedding_bag_configs() for f in c.feature_names}
    return IdRemap(remaps, feature_tables=feature_tables, feature_names=feature_names)
