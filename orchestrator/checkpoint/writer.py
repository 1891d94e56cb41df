"""DCP readers and writers for a step's data folder, with checksums taken while writing.

Hashing the bytes as they stream to storage saves re-reading every file after the save (a
second full pass over the checkpoint); that is what keeps the checksum's cost a few percent
of a save (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import FileEntry, new_hasher
from orchestrator.checkpoint.safe_load import SafeFileSystemReader, SafeFsspecReader
from orchestrator.checkpoint.storage import INJECTED


class _HashingStream:
    """Write-through file object that hashes and counts what passes."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hasher = new_hasher()
        self.size = 0

    def write(self, data: Any) -> int:
        n = self._raw.write(data)
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self.size += view.nbytes
        return n if n is not None else view.nbytes

    def entry(self) -> FileEntry:
        return FileEntry(size=self.size, checksum=self._hasher.hexdigest())

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self._raw, name)


class _HashingFileSystem:
    """Wraps DCP's FileSystem: every file written is hashed, by base name, in `written`; and
    every stream opened meets the storage faults chaos injected (storage.INJECTED)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.written: dict[str, FileEntry] = {}

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        INJECTED.check("write" if "w" in mode else "read")
        with self._inner.create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        with self._lock:
            self.written[os.path.basename(str(path))] = stream.entry()

    def rename(self, path: Any, new_path: Any) -> None:
        self._inner.rename(path, new_path)
        with self._lock:
            entry = self.written.pop(os.path.basename(str(path)), None)
            if entry is not None:
                self.written[os.path.basename(str(new_path))] = entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def hashing_writer(layout: RunLayout, step: int, data_dir: str) -> Any:
    """A DCP writer into the step's data folder; `writer.fs.written` gets the checksums."""
    storage = layout.storage
    parts = layout.data_dir(step, data_dir)
    if storage.is_local:
        writer = FileSystemWriter(storage.path(*parts), sync_files=True)
    else:
        # FsspecWriter's sync_files calls os.sync() on the whole host: pointless for S3.
        writer = FsspecWriter(storage.url_of(*parts), sync_files=False, **storage.options)
    writer.fs = _HashingFileSystem(writer.fs)
    return writer


def reader(layout: RunLayout, step: int, data_dir: str) -> Any:
    """The one DCP reader of a checkpoint: its `.metadata` goes through the allow-list
    (checkpoint/safe_load.py), for restore, `ckpt show`, `verify` and `export` alike."""
    storage = layout.storage
    parts = layout.data_dir(step, data_dir)
    if storage.is_local:
        r = SafeFileSystemReader(storage.path(*parts))
    else:
        r = SafeFsspecReader(storage.url_of(*parts), **storage.options)
    r.fs = _HashingFileSystem(r.fs)  # hashes nothing here: it only meets injected faults
    return r
