"""Reading a DCP checkpoint without unpickling anything it could have been given.

DCP's ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` of the
checkpoint's ``.metadata``: a crafted file runs any code when a run resumes
from it. :class:`SafeReader` is DCP's reader with that one read replaced by an
unpickler that admits only the classes checkpoint metadata is made of
(``_ADMITTED``: measured on this project's checkpoints, 1 and 2 ranks, with
``pickletools``; DCP's metadata dataclasses, torch's ``Size``, dtypes,
layouts and memory formats, the filesystem reader's ``_StorageInfo`` and the
writer's path) and checks the result's shape, so the rest of DCP can trust
it. Anything else is refused with one line naming the file
(:class:`BadCheckpointError`, a ``ConfigError``: ``python -m trainer`` and
``python -m trainer.export`` print it and exit 2). The tensors themselves DCP
reads with ``torch.load(weights_only=True)``; a bytes entry, which DCP's
planner would ``torch.load`` with weights_only off, is refused by
:meth:`SafeReader.read_data`.

Example::

    metadata = read_checkpoint_metadata(Path("outputs/run/checkpoints/step_500"))
    dcp.load(state, storage_reader=SafeReader(path))   # never dcp.load(checkpoint_id=...)
"""

from __future__ import annotations

import importlib
import io
import pickle
from concurrent.futures import Future
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from trainer.errors import ConfigError

METADATA_FILE = ".metadata"
_DAMAGED = "the checkpoint is damaged or not from shardrec"
# Every global a checkpoint's metadata pickle may name. Torch's dtypes, layouts
# and memory formats pickle as ``torch.<name>`` and are added below.
_ADMITTED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",  # admitted to be named; load.py refuses to load one
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",  # TensorProperties' memory format, an Enum
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "torch.serialization": frozenset({"_get_layout"}),  # torch.layout's reduce: a table lookup
    "torch": frozenset(
        {"Size"}
        | {
            name
            for name, value in vars(torch).items()
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format)
        }
    ),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),  # StorageMeta.checkpoint_id
}


class BadCheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely: its metadata is not plain DCP
    metadata (crafted, damaged, foreign), or a data file it lists is missing."""


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ADMITTED``."""

    def __init__(self, data: bytes, *, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name not in _ADMITTED.get(module, ()):
            raise BadCheckpointError(
                f"{self.path}: refusing to load checkpoint metadata that references "
                f"{module}.{name} (not a checkpoint metadata class); {_DAMAGED}"
            )
        # No compat renames (protocol 2's fix_imports): exactly the admitted name.
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise BadCheckpointError(
            f"{self.path}: refusing checkpoint metadata with a persistent id; {_DAMAGED}"
        )


def load_metadata_file(path: Path) -> Metadata:
    """The DCP metadata in file ``path``, unpickled with only ``_ADMITTED`` globals and checked.

    Raises :class:`BadCheckpointError` (one line naming ``path``) when the
    file is missing, unreadable, truncated, names another global, or is not
    shaped like DCP metadata.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadCheckpointError(f"{path}: cannot read it ({err.strerror}); {_DAMAGED}") from None
    try:
        metadata = _MetadataUnpickler(data, path=path).load()
    except BadCheckpointError:
        raise
    except Exception as err:  # truncated or garbage bytes fail in many ways, all the same to us
        raise BadCheckpointError(
            f"{path}: not readable as checkpoint metadata ({type(err).__name__}: "
            f"{str(err)[:120]}); {_DAMAGED}"
        ) from None
    problem = _shape_problem(metadata)
    if problem:
        raise BadCheckpointError(f"{path}: not checkpoint metadata ({problem}); {_DAMAGED}")
    return metadata


def read_checkpoint_metadata(checkpoint: Path) -> Metadata:
    """The metadata of the DCP checkpoint directory ``checkpoint`` (:func:`load_metadata_file`)."""
    return load_metadata_file(Path(checkpoint) / METADATA_FILE)


def check_data_files(checkpoint: Path, metadata: Metadata) -> None:
    """Raises :class:`BadCheckpointError` when a data file the metadata lists is missing/short."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = Path(checkpoint) / name
        if not file.is_file():
            raise BadCheckpointError(
                f"{file} is missing (its {METADATA_FILE} lists it); {_DAMAGED}"
            )
        if file.stat().st_size < size:
            raise BadCheckpointError(
                f"{file} is truncated ({file.stat().st_size} bytes, its {METADATA_FILE} "
                f"lists {size}); {_DAMAGED}"
            )


def _shape_problem(metadata: Any) -> str | None:
    """What makes ``metadata`` other than DCP metadata DCP can use, or None."""
    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}, not {Metadata.__name__}"
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        return "no state_dict_metadata dict"
    for key, entry in entries.items():
        if not isinstance(key, str):
            return f"entry key {key!r} is not a string"
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not (
            isinstance(entry, TensorStorageMetadata)
            and isinstance(entry.size, torch.Size)
            and isinstance(entry.properties, TensorProperties)
            and isinstance(entry.properties.dtype, torch.dtype)
            and isinstance(entry.chunks, list)
            and all(isinstance(c, ChunkStorageMetadata) for c in entry.chunks)
        ):
            return f"entry {key!r} is not a tensor's metadata"
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return "no storage_data dict"
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
            return f"a data file {name!r} outside the checkpoint directory"
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and min(offset, length) >= 0):
            return f"a bad offset or length in {name}"
    if not isinstance(getattr(metadata, "storage_meta", None), StorageMeta | None):
        return "storage_meta is not a StorageMeta"
    return None


class SafeReader(FileSystemReader):
    """DCP's filesystem reader that never unpickles: pass it as ``dcp.load(storage_reader=)``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:  # DCP's planner would torch.load them with weights_only off
            raise BadCheckpointError(
                f"{self.path}: refusing to load non-tensor entries {pickled[:5]} "
                f"(loading them would unpickle); shardrec checkpoints hold tensors only"
            )
        return super().read_data(plan, planner)
