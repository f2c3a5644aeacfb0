"""Id management: how a raw id reaches a table row when the table is smaller than the id space.

``model.id_management`` chooses:

- ``direct`` (the default): each table has a row for every id the source can send
  (``data.cardinalities`` plus every later day's new ids); nothing collides.
- ``hash``: each table keeps at most ``model.mc_zch_size`` rows and an id reads row
  ``id % rows``. New ids silently share rows with old ones.
- ``managed_collision``: torchrec's managed collision (``MCHManagedCollisionModule``
  in a ``ManagedCollisionEmbeddingBagCollection``). Each table keeps at most
  ``model.mc_zch_size`` rows; a sorted map (raw id -> row) admits the ids seen in
  training, evicting the least recently (``lru``) or least frequently (``lfu``)
  used every ``model.mc_eviction_interval`` steps (an evicted row is re-initialised,
  its optimizer state reset). An id not in the map (never admitted, evicted, or
  first seen in evaluation) reads the table's last row, the shared "miss" row.

Both ``hash`` and ``managed_collision`` are torchrec managed-collision collections
(hashing is :class:`ModuloCollisionModule`, a remap without state), so they shard,
pipeline and checkpoint the same way: row-wise only (torchrec's MC sharder offers
nothing else). Sharded over W ranks, the raw id range ``[0, input_hash_size)`` is
cut in W blocks; rank r remaps the ids of block r into its own rows
``[r * rows / W, (r + 1) * rows / W)``, so each rank manages its own share of the
rows (a W-rank model is W independent maps, not one: see :func:`row_wise_reference`).

The remap state (``_mch_sorted_raw_ids``, ``_mch_remapped_ids_mapping`` and the
eviction metadata, ``_mch_counts`` / ``_mch_last_access_iter``) is in the model's
state dict as row-wise sharded tensors, so DCP checkpoints it with the tables.

Example::

    settings = IdManagement(kind="managed_collision", zch_size=1000, eviction="lru")
    ebc = id_managed_collection(configs, settings, device=torch.device("cpu"))
    pooled = ebc(kjt)                  # a KeyedTensor, as an EmbeddingBagCollection's
    miss_share(ebc, kjt)               # share of kjt's lookups that read the miss row
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    ManagedCollisionModule,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from trainer.errors import ConfigError

ID_MANAGEMENT = ("direct", "hash", "managed_collision")
# torchrec's planner refuses an MC table whose bucket count the world size does not
# divide (uneven ZCH buckets); sharded, each rank's module is rebuilt with W buckets
# anyway. This count is divided by every world size 2**a * (3, 5, 7, 9, 11 or 13).
PLANNER_BUCKETS = 2**11 * 3**2 * 5 * 7 * 11 * 13
EVICTIONS = ("lru", "lfu")


@dataclass(frozen=True)
class IdManagement:
    """``model.id_management`` and its settings (see the module docstring)."""

    kind: str = "direct"
    # Rows per table; 0: the source's rows.
    zch_size: int = 0
    eviction: str = "lru"
    eviction_interval: int = 1
    # An id is admitted only if seen more than this many times in an eviction interval.
    admit_min_count: int = 0
    # Raw ids are < this (0: each table's source rows).
    input_hash_size: int = 0


def _admit_filter(counts: torch.Tensor, *, min_count: int) -> tuple[torch.Tensor, int]:
    """torchrec's threshold filter: ids seen more than ``min_count`` times pass."""
    return counts > min_count, min_count


def eviction_policy(settings: IdManagement) -> MCHEvictionPolicy:
    """The MCH eviction policy of ``model.mc_eviction`` (with the admission filter)."""
    filt = (
        partial(_admit_filter, min_count=settings.admit_min_count)
        if settings.admit_min_count > 0
        else None
    )
    if settings.eviction == "lru":
        return LRU_EvictionPolicy(threshold_filtering_func=filt)
    if settings.eviction == "lfu":
        return LFU_EvictionPolicy(threshold_filtering_func=filt)
    raise ValueError(f"model.mc_eviction={settings.eviction!r}: use one of {EVICTIONS}")


class ModuloCollisionModule(ManagedCollisionModule):
    """Hashing as a torchrec managed-collision module: id -> ``offset + id % rows``.

    No state and no eviction; sharded row-wise like MCH (each rank takes its block of
    the id range modulo its own rows)."""

    def __init__(
        self,
        zch_size: int,
        device: torch.device,
        input_hash_size: int,
        output_global_offset: int = 0,
        output_segments: list[int] | None = None,
        buckets: int = 1,
    ) -> None:
        if output_segments is None:
            output_segments = [output_global_offset, output_global_offset + zch_size]
        super().__init__(device=device, output_segments=output_segments)
        self._zch_size = zch_size
        self._input_hash_size = input_hash_size
        self._output_global_offset = output_global_offset
        self._buckets = buckets

    def preprocess(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        return features

    def profile(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        return features

    def remap(
        self,
        features: dict[str, JaggedTensor],
        mutate_miss_lengths: bool = True,
        write_weights: torch.Tensor | None = None,
    ) -> dict[str, JaggedTensor]:
        return {
            name: JaggedTensor(
                values=jt.values() % self._zch_size + self._output_global_offset,
                lengths=jt.lengths(),
                offsets=jt.offsets(),
                weights=jt.weights_or_none(),
            )
            for name, jt in features.items()
        }

    def forward(
        self, features: dict[str, JaggedTensor], mutate_miss_lengths: bool = True
    ) -> dict[str, JaggedTensor]:
        return self.remap(features)

    def evict(self) -> torch.Tensor | None:
        return None

    def output_size(self) -> int:
        return self._zch_size

    def input_size(self) -> int:
        return self._input_hash_size

    def buckets(self) -> int:
        return self._buckets

    def validate_state(self) -> None:
        return None

    def open_slots(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.int64, device=self.device)

    def rebuild_with_output_id_range(
        self,
        output_id_range: tuple[int, int],
        output_segments: list[int],
        device: torch.device | None = None,
    ) -> ModuloCollisionModule:
        return type(self)(
            zch_size=output_id_range[1] - output_id_range[0],
            device=device or self.device,
            input_hash_size=self._input_hash_size,
            output_global_offset=output_id_range[0],
            output_segments=output_segments,
            buckets=len(output_segments) - 1,
        )


class IdManagedTables(nn.Module):
    """A managed-collision EBC that returns only the pooled ``KeyedTensor``, the contract
    of an EmbeddingBagCollection (DLRM's SparseArch calls it like one). Sharded, ``mc``
    becomes torchrec's ShardedManagedCollisionEmbeddingBagCollection."""

    def __init__(self, mc: ManagedCollisionEmbeddingBagCollection) -> None:
        super().__init__()
        self.mc = mc
        self._configs = list(mc._embedding_module.embedding_bag_configs())
        self.register_load_state_dict_post_hook(lambda module, _keys: module.check_remap())

    def remap_modules(self) -> dict[str, ManagedCollisionModule]:
        """Each table's remap module (sharded: this rank's, for its block of ids)."""
        return dict(self.mc._managed_collision_collection._managed_collision_modules.items())

    def check_remap(self) -> None:
        """After a load: every mapped id lies in this rank's block of the id range and maps
        to this rank's rows. torchrec cannot reshard the remap state: a checkpoint saved
        on another number of ranks (other than onto one rank) fails here, by name."""
        for table, m in self.remap_modules().items():
            if not isinstance(m, MCHManagedCollisionModule):
                continue
            start, size = m._output_global_offset, m._zch_size
            # Sharded, torchrec rebuilt the module with one bucket per rank.
            blocks = 1 if m.buckets() == PLANNER_BUCKETS else m.buckets()
            rank = dist.get_rank() if blocks > 1 else 0
            block = -(-m._input_hash_size // blocks)
            ids = m._mch_sorted_raw_ids
            used = ids != torch.iinfo(torch.int64).max
            rows = m._mch_remapped_ids_mapping
            ids_ok = bool(((ids[used] >= rank * block) & (ids[used] < (rank + 1) * block)).all())
            rows_ok = bool(((rows >= start) & (rows < start + size)).all())
            if not (ids_ok and rows_ok):
                raise ConfigError(
                    f"model.id_management=managed_collision: table {table}'s remap state "
                    f"does not fit this plan (rank {rank} of {blocks}, rows "
                    f"[{start}, {start + size})); it was saved on another number of ranks. "
                    f"torchrec cannot reshard managed-collision state: resume on the world "
                    f"size that saved it (or on one rank)"
                )

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        mc = self.mc
        if not isinstance(mc, ManagedCollisionEmbeddingBagCollection):
            return mc(features)[0]  # sharded: torchrec resets evicted rows itself
        # Unsharded, torchrec's MC-EBC drops its evictions (its evict() is a TODO):
        # do what the sharded module does, re-initialise the rows given to new ids
        # before the lookup (the fused optimizer's state of those rows is not reset).
        remapped = mc._managed_collision_collection(features)
        reset_evicted_rows(mc._embedding_module, mc._managed_collision_collection.evict())
        return mc._embedding_module(remapped)


def reset_evicted_rows(
    ebc: EmbeddingBagCollection, evictions: dict[str, torch.Tensor | None]
) -> None:
    """Re-initialises (the table config's ``init_fn``) the rows just given to new ids."""
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    with torch.no_grad():
        for table, rows in evictions.items():
            if rows is None or rows.numel() == 0:
                continue
            weight = ebc.embedding_bags[table].weight
            weight[rows] = configs[table].init_fn(weight[rows])  # type: ignore[misc]


def managed_rows(configs: Sequence[EmbeddingBagConfig], settings: IdManagement) -> list[int]:
    """Rows each table keeps under ``settings``: ``zch_size`` (0: the source's rows). A
    managed-collision table uses one row fewer for ids: its last row is the miss row."""
    if settings.kind == "direct" or settings.zch_size <= 0:
        return [c.num_embeddings for c in configs]
    return [settings.zch_size for _ in configs]


def id_managed_collection(
    configs: Sequence[EmbeddingBagConfig], settings: IdManagement | None, *, device: torch.device
) -> nn.Module:
    """The model's tables: a plain EmbeddingBagCollection (``direct``), or an
    :class:`IdManagedTables` whose tables keep :func:`managed_rows` rows each."""
    if settings is None or settings.kind == "direct":
        return EmbeddingBagCollection(tables=list(configs), device=device)
    rows = managed_rows(configs, settings)
    small = [dataclasses.replace(c, num_embeddings=n) for c, n in zip(configs, rows)]
    modules: dict[str, ManagedCollisionModule] = {}
    for config, source_rows, n in zip(small, (c.num_embeddings for c in configs), rows):
        input_size = settings.input_hash_size or source_rows
        if settings.kind == "hash":
            modules[config.name] = ModuloCollisionModule(
                n, device, input_size, buckets=PLANNER_BUCKETS
            )
        elif settings.kind == "managed_collision":
            modules[config.name] = MCHManagedCollisionModule(
                zch_size=n,
                device=device,
                eviction_policy=eviction_policy(settings),
                eviction_interval=settings.eviction_interval,
                input_hash_size=input_size,
                name=config.name,
                buckets=PLANNER_BUCKETS,
            )
        else:
            raise ValueError(f"model.id_management={settings.kind!r}: use one of {ID_MANAGEMENT}")
    ebc = EmbeddingBagCollection(tables=small, device=device)
    mcc = ManagedCollisionCollection(modules, embedding_configs=small)
    mc = ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=False)
    return IdManagedTables(mc)


def id_management(model: object) -> IdManagement | None:
    """The settings of a ``ModelConfig`` (its ``id_management`` and ``mc_*`` keys);
    None for ``direct``."""
    kind = str(getattr(model, "id_management", "direct"))
    if kind == "direct":
        return None
    return IdManagement(
        kind=kind,
        zch_size=model.mc_zch_size,  # type: ignore[attr-defined]
        eviction=str(model.mc_eviction),  # type: ignore[attr-defined]
        eviction_interval=model.mc_eviction_interval,  # type: ignore[attr-defined]
        admit_min_count=model.mc_admit_min_count,  # type: ignore[attr-defined]
        input_hash_size=model.mc_input_hash_size,  # type: ignore[attr-defined]
    )
