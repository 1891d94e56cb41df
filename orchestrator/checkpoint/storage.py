"""The run's storage: a thin layer over fsspec with the few operations the protocol needs.

Local paths, file:// and s3:// go through the same code; memory:// serves unit tests. S3
endpoint, region and credentials come the usual AWS ways (environment, profile, instance role)
through s3fs/botocore and are never stored by us.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orchestrator.errors import StorageError


@dataclass(frozen=True)
class FileInfo:
    name: str
    """Base name of the file."""
    size: int


class Storage:
    """A root URL and the filesystem that serves it. Paths given to methods are relative."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open storage {url!r}: {e}") from e
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of a relative path."""
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def url_of(self, *parts: str) -> str:
        """Full URL of a relative path, as handed to DCP's fsspec reader and writer."""
        return "/".join([self.url, *parts]) if parts else self.url

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def list_dir(self, *parts: str) -> list[FileInfo]:
        """Files and folders directly under a folder; empty when it does not exist."""
        try:
            # refresh: object stores cache listings, and a commit must be seen at once.
            entries = self.fs.ls(self.path(*parts), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [FileInfo(name=e["name"].rstrip("/").rsplit("/", 1)[-1], size=int(e.get("size") or 0))
                for e in entries]

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def open_read(self, *parts: str):
        return self.fs.open(self.path(*parts), "rb")

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Make `data` appear at the path whole or not at all.

        On local disk: write a temporary file, fsync it, rename over the target, fsync the
        folder (without that the rename itself can be lost in a crash). On object stores a
        single PUT is atomic already.
        """
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove_tree(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
