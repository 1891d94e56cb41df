"""The run's storage: a thin layer over fsspec with the few operations the protocol needs.

Local paths, file:// and s3:// go through the same code; memory:// serves unit tests. S3
endpoint, region and credentials come the usual AWS ways (environment, profile, instance role)
through s3fs/botocore and are never stored by us.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orchestrator.errors import ConfigError, StorageError

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


S3_MAX_ATTEMPTS = 10
"""botocore's attempts per S3 request, in its standard mode: exponential backoff with jitter,
per request. Not its adaptive mode: that one also rate-limits every later request of the
client after one SlowDown, which made a save through a few throttled PUTs 2.4x slower here
(tests/integration/test_save_failures.py, 43 s against 18 s), and botocore calls it
experimental."""


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`, handed to every filesystem that reaches it: ours, DCP's
    readers and writers, the data source. On S3, botocore's own retries for every request,
    the shard reads and writes of DCP included (they never pass through `with_retries`)."""
    if url.startswith("s3://"):
        return {"config_kwargs": {"retries": {"mode": "standard",
                                              "max_attempts": S3_MAX_ATTEMPTS}}}
    return {}


class InjectedFaults:
    """Storage faults injected by chaos (fail_reads, delay_writes, ...) into this process's
    next storage operations. Checked inside each operation, under its retries: a read that
    fails once is retried as a real one would be. Thread-safe: background saves write too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[list] = []  # [op, count left, delay_s]

    def arm(self, op: str, count: int, delay_s: float = 0.0) -> None:
        """The next `count` operations `op` ('read' or 'write') fail with EIO, or take
        `delay_s` longer when it is > 0."""
        with self._lock:
            self._armed.append([op, count, delay_s])

    def check(self, op: str) -> None:
        with self._lock:
            armed = next((a for a in self._armed if a[0] == op), None)
            if armed is None:
                return
            armed[1] -= 1
            if armed[1] <= 0:
                self._armed.remove(armed)
        if armed[2] > 0:
            time.sleep(armed[2])
            return
        raise OSError(errno.EIO, f"injected storage fault: a {op} failed (chaos)")


INJECTED = InjectedFaults()


def with_retries(op: Callable[[], T], what: str, *, attempts: int = RETRY_ATTEMPTS,
                 initial_s: float | None = None, sleep: Callable[[float], Any] = time.sleep,
                 retryable: Callable[[BaseException], bool] = is_transient) -> T:
    """Run `op`, retrying the errors `retryable` accepts with exponential backoff (0.2, 0.4,
    0.8 s, ...; `initial_s` None: RETRY_INITIAL_S as it is now)."""
    initial_s = RETRY_INITIAL_S if initial_s is None else initial_s
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


_VARIABLE = re.compile(r"\$(\w+|\{(\w+)\})")


def expand_local(url: str) -> str:
    """A local path or file:// URL with its environment variables ($VAR, ${VAR}) expanded in
    this process's environment; any other URL as it is.

    Each process expands the path itself, so a path such as `$LOCAL_SSD/runs` names each
    node's own disk: the workers' start-up probe (storage_probe.py) then refuses a run whose
    ranks do not all reach the same storage.
    """
    if "://" in url and not url.startswith("file://"):
        return url
    missing = sorted({m.group(2) or m.group(1) for m in _VARIABLE.finditer(url)}
                     - set(os.environ))
    if missing:
        raise ConfigError(
            f"storage {url!r} names ${missing[0]}, which is not set on {socket.gethostname()} "
            f"(pid {os.getpid()}); set it on every node, or give the path itself")
    expanded = _VARIABLE.sub(lambda m: os.environ[m.group(2) or m.group(1)], url)
    if expanded != url and not expanded.removeprefix("file://").startswith("/"):
        raise ConfigError(f"storage {url!r} is {expanded!r} here, not an absolute path: "
                           "the workers would each resolve it against their own folder")
    return expanded


class Storage:
    """A root URL and the filesystem that serves it. Paths given to methods are relative."""

    def __init__(self, url: str) -> None:
        self.as_written = url.rstrip("/")
        """The URL before this process expanded its environment variables: the same on
        every node."""
        self.url = expand_local(self.as_written)
        self.options = storage_options(self.url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open storage {url!r}: {e}") from e
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # On S3 botocore retries every request itself (storage_options); retrying its final
        # answer again would only multiply the wait.
        self._attempts = RETRY_ATTEMPTS if self.is_local else 1

    def retry(self, op: Callable[[], T], what: str) -> T:
        """`op` with this storage's retries of transient errors."""
        return with_retries(op, what, attempts=self._attempts)

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of a relative path."""
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def url_of(self, *parts: str) -> str:
        """Full URL of a relative path, as handed to DCP's fsspec reader and writer."""
        return "/".join([self.url, *parts]) if parts else self.url

    def exists(self, *parts: str) -> bool:
        return self.retry(lambda: self.fs.exists(self.path(*parts)), "exists")

    def list_dir(self, *parts: str) -> list[FileInfo]:
        """Files and folders directly under a folder; empty when it does not exist."""
        try:
            # refresh: object stores cache listings, and a commit must be seen at once.
            entries = self.retry(
                lambda: self.fs.ls(self.path(*parts), detail=True, refresh=True), "list")
        except FileNotFoundError:
            return []
        return [FileInfo(name=e["name"].rstrip("/").rsplit("/", 1)[-1], size=int(e.get("size") or 0))
                for e in entries]

    def read_bytes(self, *parts: str) -> bytes:
        def read() -> bytes:
            INJECTED.check("read")
            return self.fs.cat_file(self.path(*parts))
        return self.retry(read, "read")

    def open_read(self, *parts: str):
        path = self.path(*parts)
        if not self.is_local:
            # s3fs pins the ETag it last listed; a file replaced since (by another process)
            # would then fail to open instead of being read as it is now.
            self.fs.invalidate_cache(path)
        def open_() -> Any:
            INJECTED.check("read")
            return self.fs.open(path, "rb")
        return self.retry(open_, "open")

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Make `data` appear at the path whole or not at all.

        On local disk: write a temporary file, fsync it, rename over the target, fsync the
        folder (without that the rename itself can be lost in a crash). On object stores a
        single PUT is atomic already.
        """
        target = self.path(*parts)
        if not self.is_local:
            def put() -> None:
                INJECTED.check("write")
                self.fs.pipe_file(target, data)
            self.retry(put, "write")
            return
        INJECTED.check("write")
        folder, tmp = _durable_temp(target, data)
        os.replace(tmp, target)
        fsync_dir(folder)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create the file with `data` only if it does not exist: True if this call created
        it, False if it was there already. Atomic against any number of racing writers: on
        local disk a hard link of a complete temporary file (link fails if the target
        exists); on S3 one PUT with `If-None-Match: *` (412 if the key exists)."""
        target = self.path(*parts)
        if not self.is_local:
            try:
                self.fs.pipe_file(target, data, mode="create")
                return True
            except FileExistsError:
                # A retried PUT whose first try went through also ends here: it is ours
                # if it holds exactly our bytes (callers put a unique nonce in them).
                try:
                    return self.fs.cat_file(target) == data
                except OSError:
                    return False
        folder, tmp = _durable_temp(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_dir(folder)
        return True

    def makedirs(self, *parts: str) -> None:
        # Object stores have no folders, and s3fs's makedirs would create a missing bucket:
        # a storage that does not exist must stay an error.
        if self.is_local:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove_file(self, *parts: str) -> None:
        try:
            self.retry(lambda: self.fs.rm_file(self.path(*parts)), "remove")
        except FileNotFoundError:
            pass

    def remove_tree(self, *parts: str) -> None:
        try:
            self.retry(lambda: self.fs.rm(self.path(*parts), recursive=True), "remove")
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


TEMP_PREFIX = ".tmp-"
"""How the temporary files of `write_atomic` on local disk begin: a listing of a folder being
written may show one, complete, before its rename (never a file of its own)."""


def is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def _durable_temp(target: str, data: bytes) -> tuple[str, str]:
    """`data` in a new temporary file beside `target`, fsynced: (folder, temporary path)."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(target)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return folder, tmp


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
