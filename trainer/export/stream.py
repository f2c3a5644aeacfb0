"""The streamed export: every table packed where its rows are, one table at a time.

No process ever holds the fp32 model. Per table, in the order of the model's
collection (every rank walks the same list):

* **row-wise / table-wise shards** (and data-parallel tables, on rank 0): each
  rank packs its own rows (compression/serving.py: ``pack_rows``) and sends
  the packed rows to rank 0 (``gather_object``). Quantization is per row, so a
  shard's packed rows are byte for byte the whole table's packed rows there.
* **column-wise shards**: a column slice has no row min/max (nor ``mse`` fit) of
  its own, so the ranks send that one table's fp32 slices to rank 0, which
  packs the assembled rows (chosen over all-reducing min/max, as QAT does in
  training, because it gives the whole-row bytes for every ``qat.range`` and
  needs no second packing path; it costs one fp32 table in flight on rank 0).
* **offline** (``python -m trainer.export``, one process): the table is read
  from the checkpoint alone (DCP with trainer/checkpoint/safe_reader.py's
  ``SafeReader``), packed, and dropped.

Rank 0 keeps the packed rows of every table (the bundle's program holds them
all) and the dense layers (replicated; rank 0's, or the checkpoint's), which it
loads into the trained model built with its tables on ``meta``. The trained
eval the export compares against (``max_abs_logit_diff``) is a second program
whose QAT tables are packed with the bits and range QAT trained with (served
rows are bit for bit the fake-quantized rows, tests/test_export.py), and whose
tables served with other bits (post-training quantization) are packed fp32:
when every table is served as it trained, both are one program and nothing
more is held; otherwise rank 0 also holds those tables' trained rows.

A hashed or managed-collision DLRM (``model.id_management``) is streamed the
same way: its tables are the ones behind the remap, each rank's row block is
recorded (``TablePacks.row_blocks``: the served remap is the sharded one), and
a managed-collision table's map (row-wise sharded like its rows) meets on rank
0 with it (trainer/export/remap.py).

Covered: DLRMs, DeepFM and Wide&Deep (their wide ``w_<table>`` tables are
ordinary tables here, walked after the field tables) under the converters
table QAT, dense QAT and those with no export hooks (precision, dense
pruning). :func:`streamable` says why not otherwise (row pruning,
distillation), and trainer/export/step.py then gathers the whole model on rank
0 as before.

Example::

    specs = table_specs(meta_trained, converters)
    for spec, packs in sharded_tables(dmp, specs):        # collective
        if packs is not None:                              # rank 0
            served[spec.name] = packed_table(spec, packs, spec.served)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compression.bundle import PackedTable, UnsupportedModel, collections_of, family
from compression.converter import Converter, Converters
from compression.dense_qat import DenseQAT
from compression.serving import pack_rows
from compression.table_qat import TableQAT
from trainer.checkpoint.safe_reader import SafeReader, read_checkpoint_metadata
from trainer.export.remap import remap_specs

# (bits or None for fp32, row range): how a table's rows are packed.
Packing = tuple[int | None, str]
_HOOKS = ("wrap_model", "prepare_trained", "as_trained_eval", "to_serving")
_COVERED = (TableQAT, DenseQAT)
# FBGEMM SparseType values of the packed rows.
_TY = {None: 0, 8: 2, 4: 3, 2: 4}


@dataclass(frozen=True)
class TableSpec:
    """One table: its state-dict ``key``, shape, pooling and the two packings."""

    name: str
    key: str
    rows: int
    dim: int
    pooling: int
    served: Packing
    trained: Packing
    # model.id_management of the table, and the state keys of its remap (a
    # managed-collision map: row-wise sharded like the table, gathered with it).
    id_management: str = "direct"
    remap_keys: tuple[str, ...] = ()

    def packings(self) -> list[Packing]:
        return list(dict.fromkeys([self.served, self.trained]))


@dataclass
class TablePacks:
    """What rank 0 receives of one table: its rows packed each way; the first row of each
    rank's block of rows, then the rows (``[0, rows]`` when not row-sharded); and its
    remap state (``spec.remap_keys``, whole) where it is not in the dense state."""

    rows: dict[Packing, Tensor]
    row_blocks: list[int]
    remap_state: dict[str, Tensor]


def streamable(converters: Converters, meta_trained: nn.Module) -> str | None:
    """None when the streamed export covers this run, else why not (one line)."""
    for c in converters:
        hooks = [h for h in _HOOKS if getattr(type(c), h) is not getattr(Converter, h)]
        if hooks and not isinstance(c, _COVERED):
            return f"converter {c.name} changes the model at export ({', '.join(hooks)})"
    model = getattr(meta_trained, "model", None)
    try:
        family(model)  # a DLRM, DeepFM or Wide&Deep
    except UnsupportedModel as err:
        return str(err)
    if not all(isinstance(c, EmbeddingBagCollection) for c in collections_of(model).values()):
        return "a collection is not a torchrec EmbeddingBagCollection"
    return None


def table_specs(meta_trained: nn.Module, converters: Converters) -> list[TableSpec]:
    """Every table of the trained model (built on ``meta``): each collection's
    (compression.bundle.collections_of: a DeepFM / Wide&Deep's wide tables after
    its field tables), in the collection's order."""
    qat = next((c for c in converters if isinstance(c, TableQAT)), None)
    remaps = remap_specs(meta_trained)
    return [
        spec
        for ebc in collections_of(meta_trained.model).values()
        for spec in _collection_specs(meta_trained, ebc, qat, remaps)
    ]


def _collection_specs(
    meta_trained: nn.Module,
    ebc: nn.Module,
    qat: TableQAT | None,
    remaps: dict[str, tuple[str, tuple[str, ...]]],
) -> list[TableSpec]:
    assert isinstance(ebc, EmbeddingBagCollection), type(ebc)
    prefix = next(n for n, m in meta_trained.named_modules() if m is ebc)
    specs = []
    for config in ebc.embedding_bag_configs():
        name = config.name
        served: Packing = (None, "minmax")
        trained: Packing = (None, "minmax")
        if qat is not None and name in qat.export_bits:
            served = (qat.export_bits[name], qat.export_row_range)
        if qat is not None and name in qat.bits:
            trained = (qat.bits[name], qat.row_range)
        specs.append(
            TableSpec(
                name=name,
                key=f"{prefix}.embedding_bags.{name}.weight",
                rows=config.num_embeddings,
                dim=config.embedding_dim,
                pooling=0 if config.pooling == PoolingType.SUM else 1,
                served=served,
                trained=trained,
                id_management=remaps[name][0] if name in remaps else "direct",
                remap_keys=remaps[name][1] if name in remaps else (),
            )
        )
    return specs


def packed_table(spec: TableSpec, packs: TablePacks, packing: Packing) -> PackedTable:
    """The :class:`PackedTable` of ``spec`` packed as ``packing``."""
    return PackedTable(packs.rows[packing], _TY[packing[0]], spec.dim, spec.pooling)


def _pack(rows: Tensor, spec: TableSpec) -> dict[Packing, Tensor]:
    return {p: pack_rows(rows.float(), bits=p[0], row_range=p[1]) for p in spec.packings()}


def sharded_tables(
    model: nn.Module, specs: list[TableSpec]
) -> Iterator[tuple[TableSpec, TablePacks | None]]:
    """Collective: per table, its packed rows (and remap state) on rank 0 (None on the
    other ranks)."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    state = model.state_dict()
    for spec in specs:
        value = state[spec.key]
        remap_state = {k: _whole(state[k], rank) for k in spec.remap_keys}  # collective
        if not isinstance(value, ShardedTensor):  # data parallel: replicated, rank 0's
            packs = _pack(value.detach().cpu(), spec) if rank == 0 else None
            yield spec, None if packs is None else TablePacks(packs, [0, spec.rows], remap_state)
            continue
        shards = value.metadata().shards_metadata
        row_blocks = sorted({m.shard_offsets[0] for m in shards}) + [spec.rows]
        column_split = any(m.shard_sizes[1] < spec.dim for m in shards)
        pieces = []
        for shard in value.local_shards():
            rows = shard.tensor.detach().cpu()
            offsets = tuple(shard.metadata.shard_offsets)
            # Column slices travel as fp32 (whole rows are packed on rank 0).
            pieces.append((offsets, rows.float() if column_split else _pack(rows, spec)))
        gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
        if distributed:
            dist.gather_object(pieces, gathered, dst=0)
        else:
            gathered = [pieces]
        del pieces
        if rank != 0:
            yield spec, None
            continue
        assert gathered is not None
        all_pieces = [p for rank_pieces in gathered for p in rank_pieces]
        del gathered
        if column_split:
            full = torch.full((spec.rows, spec.dim), float("nan"))
            for (row, col), rows in all_pieces:
                full[row : row + rows.shape[0], col : col + rows.shape[1]] = rows
            del all_pieces
            if full.isnan().any():
                raise RuntimeError(f"{spec.key}: the shards do not cover the table")
            yield spec, TablePacks(_pack(full, spec), row_blocks, remap_state)
            continue
        yield spec, TablePacks(_assemble_rows(spec, all_pieces), row_blocks, remap_state)


def _whole(value: Tensor, rank: int) -> Tensor:
    """Collective for a ShardedTensor: the whole tensor on rank 0 (an empty one elsewhere)."""
    if not isinstance(value, ShardedTensor):
        return value.detach().cpu().clone()
    # Not ShardedTensor.gather: it turns torchrec's empty slots (int64 max) into int64 min.
    pieces = [(s.metadata.shard_offsets[0], s.tensor.detach().cpu()) for s in value.local_shards()]
    gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.gather_object(pieces, gathered, dst=0)
    else:
        gathered = [pieces]
    if rank != 0:
        return torch.empty(0)
    assert gathered is not None
    whole = torch.empty(value.size(), dtype=value.dtype)
    for offset, local in (p for rank_pieces in gathered for p in rank_pieces):
        whole[offset : offset + local.shape[0]] = local
    return whole


def _assemble_rows(spec: TableSpec, pieces: list) -> dict[Packing, Tensor]:
    """Each packing's whole table from row-wise pieces ``((row, 0), {packing: rows})``."""
    out: dict[Packing, Tensor] = {}
    for packing in spec.packings():
        row_bytes = pieces[0][1][packing].shape[1]
        table = torch.empty(spec.rows, row_bytes, dtype=torch.uint8)
        covered = 0
        for (row, _), packs in pieces:
            part = packs.pop(packing)
            table[row : row + part.shape[0]] = part
            covered += part.shape[0]
        if covered != spec.rows:
            raise RuntimeError(f"{spec.key}: shards hold {covered} of {spec.rows} rows")
        out[packing] = table
    return out


def checkpoint_tables(
    checkpoint: Path, specs: list[TableSpec]
) -> Iterator[tuple[TableSpec, TablePacks]]:
    """One process: each table read alone from the checkpoint (every rank's shards),
    packed, and dropped before the next is read; its remap state is in the dense
    state (:func:`checkpoint_dense`), its ranks' row blocks from the saved shards."""
    metadata = read_checkpoint_metadata(checkpoint).state_dict_metadata
    for spec in specs:
        saved = metadata[f"model.{spec.key}"]
        state = {
            "model": {spec.key: torch.empty(spec.rows, spec.dim, dtype=saved.properties.dtype)}
        }
        _load(checkpoint, state)
        starts = sorted({c.offsets[0] for c in getattr(saved, "chunks", [])} | {0})
        rows = _pack(state["model"].pop(spec.key), spec)
        yield spec, TablePacks(rows, starts + [spec.rows], {})


def checkpoint_dense(checkpoint: Path, *, skip: set[str]) -> tuple[dict[str, Tensor], int]:
    """One process: the checkpoint's model entries but the tables in ``skip``, and the step."""
    metadata = read_checkpoint_metadata(checkpoint).state_dict_metadata
    model = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.") and key.removeprefix("model.") not in skip
    }
    state = {"model": model, "trainer": {"step": torch.tensor(0)}}
    _load(checkpoint, state)
    return state["model"], int(state["trainer"]["step"])


def _load(checkpoint: Path, state: dict) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, storage_reader=SafeReader(checkpoint), no_dist=True)


def dense_state(model: nn.Module, *, skip: set[str]) -> dict[str, Tensor]:
    """Rank 0's replicated entries of a sharded model's state (cpu), but ``skip``."""
    return {
        key: value.detach().cpu()
        for key, value in model.state_dict().items()
        if key not in skip and not isinstance(value, ShardedTensor)
    }


def load_dense(
    trained: nn.Module, state: dict[str, Tensor], *, tables: set[str], converters: Converters
) -> None:
    """In place: the ``meta`` model's non-table weights become cpu tensors holding ``state``
    (the tables stay on ``meta``; ``converters.prepare_trained`` runs in between, as
    for build_trained); raises when ``state`` lacks one."""
    keep = {id(t) for key, t in trained.state_dict(keep_vars=True).items() if key in tables}
    for module in trained.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta or id(tensor) in keep:
                    continue
                empty = torch.zeros_like(tensor, device="cpu")
                if isinstance(tensor, nn.Parameter):
                    empty = nn.Parameter(empty, tensor.requires_grad)
                store[name] = empty
    converters.prepare_trained(trained)
    result = trained.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tables)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"dense state does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
