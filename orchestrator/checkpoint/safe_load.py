"""Reading a checkpoint without running code from it.

Whoever can write the run's storage can rewrite any file, manifest.json and its checksums
included (the trust model of DESIGN.md), so nothing read from a checkpoint is unpickled
freely. Three paths used to do that, and each goes through this module now:

- DCP's `.metadata`, a pickle (torch's `FileSystemReader.read_metadata` calls `pickle.load`):
  read by `MetadataUnpickler`, which admits only DCP's metadata classes, torch's sizes,
  dtypes and layouts, and paths;
- non-tensor values inside the shards (ints, lists, dicts: DCP stores them with
  `torch.save` and its default planner loads them with `weights_only=False`): loaded with
  `weights_only=True` by the planners here;
- the RNG states of format-1 and format-2 checkpoints, which held Python's and numpy's RNG
  state as pickled bytes (now they are tensors): `legacy_rng_state` admits the numpy classes
  an RNG state needs and nothing else.

Whatever else a checkpoint holds is refused with `UnsafeCheckpointError`, before it is built.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from orchestrator.checkpoint.manifest import is_plain_name
from orchestrator.errors import CheckpointError

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
_NUMPY_RNG_CLASSES = {("numpy", "dtype"), ("numpy", "ndarray"),
                      ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "_reconstruct")}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds something other than tensors and plain data: a pickle that names a
    class outside the allow-list. Someone who can write the storage planted it (or another
    tool wrote the checkpoint). It is refused, never loaded."""


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refused to load checkpoint metadata that names {module}.{name}: only DCP's "
            "metadata classes are allowed (the file was written by something else, or "
            "tampered with)")


def load_metadata(stream: Any, where: str) -> Metadata:
    try:
        metadata = MetadataUnpickler(stream).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- truncated or garbled: not a metadata file
        raise UnsafeCheckpointError(f"{where}: not DCP metadata ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{where}: holds a {type(metadata).__name__}, not DCP "
                                    "metadata")
    # DCP joins each item's relative_path to the save folder: it must stay inside it.
    for info in (metadata.storage_data or {}).values():
        path = getattr(info, "relative_path", None)
        if not is_plain_name(path):
            raise UnsafeCheckpointError(f"{where}: names the shard file {path!r}, not a plain "
                                        "file name in the save folder")
    return metadata


class _SafeMetadata:
    """DCP's read_metadata (torch 2.13, filesystem.py) with the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    pass


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    pass


def load_value(value: io.BytesIO, key: str) -> Any:
    """A non-tensor value saved by DCP (`torch.save` of an int, a list, a dict...)."""
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        raise UnsafeCheckpointError(
            f"refused to load the value of {key!r}: it is not plain data "
            f"({first[0][:200] if first else 'a pickle weights_only refuses'})") from None


class _SafeBytes:
    """DefaultLoadPlanner.load_bytes (torch 2.13) with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        obj = load_value(value, key)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], obj)
        else:
            self.state_dict[key] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    pass


class SafeEmptyStateDictLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    pass


class _RngUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_RNG_CLASSES:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refused to load an RNG state that names {module}.{name}")


def legacy_rng_state(data: bytes) -> tuple[Any, Any]:
    """(random.getstate(), np.random.get_state()) from a format-1/2 checkpoint's bytes."""
    try:
        py_state, np_state = _RngUnpickler(io.BytesIO(bytes(data))).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UnsafeCheckpointError(f"an RNG state that is not one ({type(e).__name__})") from None
    return py_state, np_state


def is_refusal(error: BaseException) -> bool:
    """Whether an error (DCP wraps every rank's in a CheckpointException) is our refusal."""
    if isinstance(error, UnsafeCheckpointError):
        return True
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        return any(isinstance(exc, UnsafeCheckpointError)
                   for exc, *_ in failures.values())
    return False
