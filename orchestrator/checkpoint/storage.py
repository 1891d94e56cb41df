"""The run's storage: a thin layer over fsspec with the few operations the protocol needs.

Local paths, file:// and s3:// go through the same code; memory:// serves unit tests. S3
endpoint, region and credentials come the usual AWS ways (environment, profile, instance role)
through s3fs/botocore and are never stored by us.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orchestrator.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth another try: the network, throttling, a service hiccup. Everything else (not
# found, access denied, no such bucket) is an answer, and retrying it only delays the message.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY,
                     errno.ECONNREFUSED, errno.EPIPE, errno.ESTALE, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNABORTED}
RETRY_ATTEMPTS = 5
RETRY_INITIAL_S = 0.2

StorageFault = Literal["transient", "permanent", "mismatch"]


class ContentMismatch(ValueError):
    """A read completed, and what it read disagrees with what the manifest says (a size, a
    checksum, a manifest that does not parse): the one proof that a checkpoint is bad."""


def classify_storage_error(error: BaseException) -> StorageFault:
    """What a failed storage operation proves.

    - transient: the network, throttling, a stale handle: try again;
    - permanent: an answer (not found, forbidden, not a folder): trying again will not help,
      but it says nothing about the bytes of a checkpoint either;
    - mismatch: the read completed and the content is wrong (ContentMismatch, or a
      manifest that does not parse): only this marks a checkpoint invalid.
    """
    from orchestrator.checkpoint.manifest import ManifestError

    if isinstance(error, (ContentMismatch, ManifestError)):
        return "mismatch"
    if isinstance(error, (ConnectionError, TimeoutError)):
        return "transient"
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError,
                          NotADirectoryError, IsADirectoryError)):
        return "permanent"
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return "transient"
    return "permanent"


def is_transient(error: BaseException) -> bool:
    return classify_storage_error(error) == "transient"


def with_retries(op: Callable[[], T], what: str, *, attempts: int = RETRY_ATTEMPTS,
                 initial_s: float = RETRY_INITIAL_S, sleep: Callable[[float], Any] = time.sleep,
                 retryable: Callable[[BaseException], bool] = is_transient) -> T:
    """Run `op`, retrying the errors `retryable` accepts with exponential backoff (0.2, 0.4,
    0.8 s, ...)."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as e:  # noqa: BLE001 -- filtered by retryable
            if attempt == attempts or not retryable(e):
                raise
            delay = initial_s * 2 ** (attempt - 1)
            # The error's type and errno only: messages from botocore can quote request
            # details, and credentials must never reach a log.
            log.warning("storage: %s failed (%s, errno %s); retry %d of %d in %.1f s",
                        what, type(e).__name__, getattr(e, "errno", None), attempt,
                        attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


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
        return with_retries(lambda: self.fs.exists(self.path(*parts)), "exists")

    def list_dir(self, *parts: str) -> list[FileInfo]:
        """Files and folders directly under a folder; empty when it does not exist."""
        try:
            # refresh: object stores cache listings, and a commit must be seen at once.
            entries = with_retries(
                lambda: self.fs.ls(self.path(*parts), detail=True, refresh=True), "list")
        except FileNotFoundError:
            return []
        return [FileInfo(name=e["name"].rstrip("/").rsplit("/", 1)[-1], size=int(e.get("size") or 0))
                for e in entries]

    def read_bytes(self, *parts: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(*parts)), "read")

    def open_read(self, *parts: str):
        path = self.path(*parts)
        if not self.is_local:
            # s3fs pins the ETag it last listed; a file replaced since (by another process)
            # would then fail to open instead of being read as it is now.
            self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.open(path, "rb"), "open")

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Make `data` appear at the path whole or not at all.

        On local disk: write a temporary file, fsync it, rename over the target, fsync the
        folder (without that the rename itself can be lost in a crash). On object stores a
        single PUT is atomic already.
        """
        target = self.path(*parts)
        if not self.is_local:
            with_retries(lambda: self.fs.pipe_file(target, data), "write")
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
        # Object stores have no folders, and s3fs's makedirs would create a missing bucket:
        # a storage that does not exist must stay an error.
        if self.is_local:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove_file(self, *parts: str) -> None:
        try:
            with_retries(lambda: self.fs.rm_file(self.path(*parts)), "remove")
        except FileNotFoundError:
            pass

    def remove_tree(self, *parts: str) -> None:
        try:
            with_retries(lambda: self.fs.rm(self.path(*parts), recursive=True), "remove")
        except FileNotFoundError:
            pass

    def tree_stats(self, *parts: str) -> tuple[int, float | None]:
        """Total bytes, and newest modification time (epoch seconds), of the files under a
        folder: one listing of the whole tree."""
        try:
            found = self.fs.find(self.path(*parts), detail=True)
        except FileNotFoundError:
            return 0, None
        times = [t for t in map(_mtime, found.values()) if t is not None]
        return (sum(int(info.get("size") or 0) for info in found.values()),
                max(times, default=None))

    def check_writable(self, *parts: str) -> None:
        """Write and remove a probe file under `parts`, so that a storage that refuses
        writes or does not exist is a one-line error before anything is started."""
        probe = (*parts, f".probe-{uuid.uuid4().hex}")
        try:
            self.makedirs(*parts)
            self.write_atomic(b"probe", *probe)
            self.remove_file(*probe)
        except Exception as e:  # noqa: BLE001 -- any failure is the answer
            reason = (getattr(e, "strerror", None) or str(e) or "no reason given")[:200]
            raise StorageError(f"storage {self.url} cannot be written: {reason} "
                               f"({type(e).__name__})") from e


def _mtime(info: dict[str, Any]) -> float | None:
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
