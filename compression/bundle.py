"""The served model as one ``torch.export`` program over plain tensors.

:func:`serving_program` turns a model quantized by
``compression.serving.quantize_for_serving`` (torchrec's quantized
``EmbeddingBagCollection`` on FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``)
into a plain :class:`ServingProgram`: each of its embedding collections is one
:class:`~compression.bundle_tables.PackedTables`, whose buffers are the TBEs'
packed rows (codes with their fp16 scale/bias, byte for byte what the quantizer
wrote, so what QAT trained against) read by FBGEMM's functional op
``torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function``; the rest
is a table-free **head** over the pooled embeddings, the model's own dense
layers (fp32, or ``Int8WeightOnlyLinear``'s int8 codes times scales), traced to
aten ops. No torchrec class is left in the program. :func:`build_program` does
the same from packed rows the trainer streamed (trainer/export/stream.py).

Architecture families (:func:`family`), each one adapter from the model to
(collections, head):

* ``dlrm`` (DLRM, DLRM-DCNv2): one collection (``sparse_arch.embedding_bag_collection``),
  head :class:`DLRMHead` = ``dense_arch``, ``inter_arch``, ``over_arch``;
* ``ctr`` (DeepFM, Wide&Deep, trainer/models/ctr.py): the field collection
  (``tables``) and the wide one (``wide``, ``w_<table>``, column 0 read), head
  :class:`CTRHead` over the model's ``head.combine``.

Every collection reads the same inputs (all features of the KJT, in its order).

Why not export the torchrec module: the TBE holds ``torch.classes.fbgemm.AtomicCounter``
script objects with no fake class, so ``torch.export`` fails on it
(pytorch#139911); the functional op has a Meta kernel (registered by
``import fbgemm_gpu``) and exports as one call.

The program's inputs are plain tensors::

    dense    float32[B, num_dense]
    ids      int64[N]                    every feature's ids, feature-major
    lengths  int64[num_features * B]     ids per (feature, sample), torchrec's KJT order

and it returns ``float32[B]`` click probabilities. Ids outside a feature's rows
read row 0 (FBGEMM's ``BoundsCheckMode.WARNING``, the eager TBE's default). A
program with a ``remap`` (hashed or managed-collision tables,
compression/bundle_remap.py) takes the raw ids and remaps them to rows first.

Loading needs torch and ``fbgemm_gpu`` only (the op registrations), no pickled
Python objects::

    import fbgemm_gpu, torch
    program = torch.export.load("bundle/model.pt2").module()
    scores = program(dense, ids, lengths)

Example::

    served = quantize_for_serving(dlrm, table_bits={"t_cat_0": 4})
    program = serving_program(served, feature_names=["cat_0", "cat_1"])
    save_program(program, Path("bundle/model.pt2"), num_dense=13, example_batch=8)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from compression.bundle_remap import IdRemap
from compression.bundle_tables import PackedTable, PackedTables, packed_tables, tbe_tables
from compression.factorized_serving import factorized_lookup

__all__ = [
    "PROGRAM_FILE",
    "CTRHead",
    "DLRMHead",
    "PackedTable",
    "PackedTables",
    "ServingProgram",
    "UnsupportedModel",
    "build_program",
    "collections_of",
    "dlrm_program",
    "export_program",
    "family",
    "load_program",
    "packed_tables",
    "program_head",
    "save_program",
    "serving_program",
    "tbe_tables",
]

PROGRAM_FILE = "model.pt2"


class UnsupportedModel(ValueError):
    """The served model is of no family the program builder knows (names what it found)."""


class ServingProgram(nn.Module):
    """``(dense, ids, lengths) -> probabilities``: each packed collection's lookups, then the head.

    ``collections``: name -> :class:`PackedTables` (registered under that name, so the
    first, ``tables``, keeps the DLRM program's buffer names); ``head`` is called as
    ``head(dense, *pooled) -> float32[B]`` logits, ``pooled`` each collection's
    ``float32[B, total_D]`` in the order given. ``remap``: the raw ids' remap to
    rows (compression/bundle_remap.py; hashed and managed-collision tables), before
    every lookup.
    """

    def __init__(
        self,
        collections: Mapping[str, PackedTables],
        head: nn.Module,
        remap: IdRemap | None = None,
    ) -> None:
        super().__init__()
        self.collection_names = list(collections)
        for name, lookups in collections.items():
            self.add_module(name, lookups)
        self.head = head
        self.remap = remap

    @property
    def collections(self) -> dict[str, PackedTables]:
        """Name -> packed collection, in the order the head reads them."""
        return {name: getattr(self, name) for name in self.collection_names}

    @property
    def num_features(self) -> int:
        """Features of the input KJT (every collection reads them all)."""
        return next(iter(self.collections.values())).num_features

    def table_bytes(self) -> int:
        """Bytes of the packed rows of every collection (and factorized tables' projections)."""
        return sum(
            t.weights.numel() + (t.extra_bytes() if hasattr(t, "extra_bytes") else 0)
            for t in self.collections.values()
        )

    def forward(self, dense: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(dense, ids, lengths))

    def logits(self, dense: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """``float32[B]`` logits (eager only: the exported program is ``forward``)."""
        if self.remap is not None:
            ids = self.remap(ids, lengths)
        pooled = [getattr(self, name)(ids, lengths) for name in self.collection_names]
        return self.head(dense, *pooled)


class DLRMHead(nn.Module):
    """DLRM's dense layers over one collection: ``(dense, pooled [B, F * D]) -> logits [B]``."""

    def __init__(self, dlrm: nn.Module, *, num_features: int, dim: int) -> None:
        super().__init__()
        self.dense_arch = dlrm.dense_arch
        self.inter_arch = dlrm.inter_arch
        self.over_arch = dlrm.over_arch
        self.num_features = num_features
        self.dim = dim

    def forward(self, dense: Tensor, pooled: Tensor) -> Tensor:
        embedded_sparse = pooled.view(-1, self.num_features, self.dim)
        embedded_dense = self.dense_arch(dense)
        concatenated = self.inter_arch(
            dense_features=embedded_dense, sparse_features=embedded_sparse
        )
        return self.over_arch(concatenated).flatten()


class CTRHead(nn.Module):
    """A DeepFM / Wide&Deep head over its field and wide collections:
    ``(dense, fields [B, sum D_f], wide [B, F * wide_dim]) -> logits [B]``.

    ``head`` is the model's (trainer/models/ctr.py ``CTRHead``), called through its
    ``combine(dense, embedded, first)``; ``field_dims``: each field's dim in the
    head's order; a wide row's column 0 is its weight.
    """

    def __init__(self, head: nn.Module, *, field_dims: list[int], wide_dim: int) -> None:
        super().__init__()
        self.head = head
        self.field_dims = list(field_dims)
        self.wide_dim = wide_dim

    def forward(self, dense: Tensor, fields: Tensor, wide: Tensor) -> Tensor:
        embedded = list(torch.split(fields, self.field_dims, dim=1))
        first = wide.view(-1, len(self.field_dims), self.wide_dim)[:, :, 0]
        return self.head.combine(dense, embedded, first).flatten()


def family(model: nn.Module) -> str:
    """``"dlrm"`` or ``"ctr"`` (module docstring); raises :class:`UnsupportedModel`."""
    sparse = getattr(model, "sparse_arch", None)
    if not isinstance(getattr(sparse, "embedding_bag_collection", None), nn.Module):
        raise UnsupportedModel(
            f"{type(model).__name__} has no sparse_arch.embedding_bag_collection"
        )
    if all(hasattr(model, p) for p in ("dense_arch", "inter_arch", "over_arch")):
        return "dlrm"
    head = getattr(model, "head", None)
    if hasattr(head, "combine") and isinstance(getattr(sparse, "wide_collection", None), nn.Module):
        return "ctr"
    raise UnsupportedModel(
        f"{type(model).__name__} is neither a DLRM (dense/inter/over arch) nor a "
        "DeepFM / Wide&Deep (head.combine, sparse_arch.wide_collection)"
    )


def collections_of(model: nn.Module) -> dict[str, nn.Module]:
    """The model's embedding collections (fp32, quantized or on meta) by program name,
    in the order its head reads them; of a managed-collision collection (hashing too,
    trainer/models/collision.py), the tables behind the remap."""
    sparse = model.sparse_arch
    tables = sparse.embedding_bag_collection
    mc = getattr(tables, "mc", None)
    if isinstance(mc, ManagedCollisionEmbeddingBagCollection):
        tables = mc._embedding_module
    if family(model) == "dlrm":
        return {"tables": tables}
    return {"tables": tables, "wide": sparse.wide_collection}


def _model_order(model: nn.Module) -> list[str]:
    if family(model) == "dlrm":
        return list(model.sparse_arch.sparse_feature_names)
    return list(model.head.feature_names)


def program_head(model: nn.Module, collections: Mapping[str, PackedTables]) -> nn.Module:
    """The table-free head of ``model`` (shared, not copied) over ``collections``."""
    tables = collections["tables"]
    if family(model) == "dlrm":
        dims = set(tables.model_dims)
        if len(dims) != 1:
            raise UnsupportedModel(
                f"a DLRM program needs one embedding dim for every feature, got {sorted(dims)}"
            )
        return DLRMHead(model, num_features=tables.num_features, dim=dims.pop())
    wide_dims = set(collections["wide"].model_dims)
    if len(wide_dims) != 1:
        raise UnsupportedModel(f"wide tables of several dims: {sorted(wide_dims)}")
    return CTRHead(model.head, field_dims=tables.model_dims, wide_dim=wide_dims.pop())


def build_program(
    tables: dict[str, PackedTable],
    *,
    model: nn.Module,
    feature_names: list[str],
    head_model: nn.Module | None = None,
    remap: IdRemap | None = None,
) -> ServingProgram:
    """:class:`ServingProgram` of the packed ``tables`` (every collection's, by table
    name; emptied as they are copied in) laid out as ``model``'s collections, with
    the head of ``head_model`` (default ``model``; e.g. its int8 dense-QAT copy)
    and the raw ids' ``remap`` (if any).

    ``feature_names``: the input order of the sparse features (the KJT keys).
    """
    head_model = model if head_model is None else head_model
    order = _model_order(model)
    collections = {}
    for name, ebc in collections_of(model).items():
        configs = ebc.embedding_bag_configs()
        feature_tables = {f: c.name for c in configs for f in c.feature_names}
        own = {t: tables.pop(t) for t in dict.fromkeys(feature_tables.values())}
        factorized = getattr(model.sparse_arch, "factorized", None)
        if name == "tables" and factorized is not None:  # compression/factorized_serving.py
            collections[name] = factorized_lookup(
                own,
                factorized=factorized,
                feature_tables=feature_tables,
                feature_names=feature_names,
                model_order=order,
            )
            continue
        collections[name] = packed_tables(
            own, feature_tables=feature_tables, feature_names=feature_names, model_order=order
        )
    return ServingProgram(collections, program_head(head_model, collections), remap).eval()


def serving_program(served: nn.Module, *, feature_names: list[str]) -> ServingProgram:
    """The plain program of a DLRM / DeepFM / Wide&Deep quantized by ``quantize_for_serving``.

    ``feature_names``: the input order of the sparse features (the KJT keys the
    trainer's batches carry). The served model is left unchanged; the program
    shares its dense layers and copies its packed rows (:func:`tbe_tables`).
    """
    tables: dict[str, PackedTable] = {}
    for name, ebc in collections_of(served).items():
        if not hasattr(ebc, "_emb_modules"):
            raise UnsupportedModel(
                f"serving_program needs quantized collections (quantize_for_serving), "
                f"{name} is a {type(ebc).__name__}"
            )
        tables.update(tbe_tables(ebc)[0])
    return build_program(tables, model=served, feature_names=feature_names)


def dlrm_program(
    tables: dict[str, PackedTable],
    *,
    feature_tables: dict[str, str],
    feature_names: list[str],
    model_order: list[str],
    dlrm: nn.Module,
) -> ServingProgram:
    """:class:`ServingProgram` of a DLRM's packed ``tables`` and ``dlrm``'s dense
    layers (shared), for an explicit layout (:func:`build_program` reads it off a model)."""
    if family(dlrm) != "dlrm":
        raise UnsupportedModel(f"{type(dlrm).__name__} is not a DLRM (dense/inter/over arch)")
    packed = packed_tables(
        tables, feature_tables=feature_tables, feature_names=feature_names, model_order=model_order
    )
    collections = {"tables": packed}
    return ServingProgram(collections, program_head(dlrm, collections)).eval()


def export_program(
    program: ServingProgram, *, num_dense: int, example_batch: int = 4
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``program`` with a dynamic batch and number of ids."""
    num_features = program.num_features
    dense = torch.zeros(example_batch, num_dense)
    lengths = torch.ones(num_features * example_batch, dtype=torch.int64)
    ids = torch.zeros(num_features * example_batch, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=2, max=1 << 24)
    num_ids = torch.export.Dim("num_ids", min=2, max=1 << 31)
    shapes = {"dense": {0: batch}, "ids": {0: num_ids}, "lengths": {0: num_features * batch}}
    with torch.no_grad():
        return torch.export.export(program, (dense, ids, lengths), dynamic_shapes=shapes)


def save_program(program: ServingProgram, path: Path, *, num_dense: int) -> None:
    """Exports ``program`` and writes it with ``torch.export.save`` (a .pt2 archive)."""
    torch.export.save(export_program(program, num_dense=num_dense), path)


def score(program: nn.Module, dense: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
    """``program(dense, ids, lengths)`` for any batch, one row included.

    The exported program's batch dimension starts at 2 (``torch.export``
    specialises sizes 0 and 1), so a single row is sent twice and scored once.
    """
    if dense.shape[0] != 1:
        return program(dense, ids, lengths)
    bags = torch.split(ids, lengths.tolist())  # one bag per feature (batch of one)
    twice = torch.cat([bag for bag in bags for _ in range(2)])
    return program(dense.expand(2, -1), twice, lengths.repeat_interleave(2))[:1]


def load_program(path: Path | str) -> nn.Module:
    """The callable of a saved program (needs ``fbgemm_gpu`` for the op, nothing pickled)."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    return torch.export.load(str(path)).module()
