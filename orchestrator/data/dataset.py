"""Opening a prepared token dataset, checking it, and reading its row groups.

Every shard is read through fsspec (local paths, file://, s3://), one row group at a time, with
Parquet's page checksums verified: a rank reads only the row groups that hold its samples,
never the whole dataset. Whole-file checksums against `dataset.json` are checked by
`check()`, which the CLI runs before anything starts.

A read that fails (EIO, a dropped connection, a 503 that botocore gave up on) proves nothing
about the data: it is retried with backoff. A read that completes with the wrong content (a
page checksum, a schema, a token out of range) is the data's fault: it is a DatasetError at
once, naming the file.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from orchestrator.checkpoint.storage import Storage, with_retries
from orchestrator.data.manifest import COLUMN, MANIFEST_NAME, DatasetManifest, ShardInfo, parse_manifest
from orchestrator.errors import DatasetError, StorageError

log = logging.getLogger(__name__)

READ_ATTEMPTS = 6
"""Tries of one row-group read: backoff 0.2, 0.4, ... 3.2 s, about 6 s in all."""
_OPEN_SHARDS = 4
_HASH_BLOCK = 8 << 20


def _retryable(error: BaseException) -> bool:
    """Whether a failed read is worth another try: a failure of the read itself, not an
    answer about the data (missing, forbidden, or read whole and wrong)."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, DatasetError,
                          pa.ArrowInvalid)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    # A failed read carries an errno (EIO, ECONNRESET; s3fs turns S3 errors it cannot name
    # into EIO). Arrow's own complaints about bytes it did read -- a page CRC, a footer it
    # cannot parse -- carry none: the bytes are wrong, and reading them again will not help.
    return isinstance(error, OSError) and error.errno is not None


def _close(pf: pq.ParquetFile) -> None:
    try:
        pf.close()
    except Exception:  # noqa: BLE001 -- closing a reader of a file that broke: nothing to do
        pass


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]


@dataclass(frozen=True)
class RowGroupRef:
    shard: int
    row_group: int


class TokenDataset:
    """A prepared dataset at `url`: its manifest, and reads of its row groups.

    Not thread-safe: one reader thread at a time (the source's prefetch thread).
    """

    def __init__(self, url: str, *, fs_storage: Storage | None = None,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        self.url = url.rstrip("/")
        try:
            self._storage = fs_storage or Storage(self.url)
        except StorageError as e:
            raise DatasetError(f"cannot open dataset {self.url}: {e}") from e
        self._sleep = sleep
        where = f"{self.url}/{MANIFEST_NAME}"
        try:
            data = with_retries(lambda: self._storage.fs.cat_file(self._storage.path(MANIFEST_NAME)),
                                f"read {MANIFEST_NAME}", retryable=_retryable, sleep=sleep)
        except FileNotFoundError as e:
            raise DatasetError(f"{where} does not exist: no dataset there (make one with "
                               "`orchestrator data prepare`)") from e
        except Exception as e:  # noqa: BLE001 -- any failure to read is this one message
            raise DatasetError(f"{where} cannot be read: {_reason(e)} "
                               f"({type(e).__name__})") from e
        self.manifest: DatasetManifest = parse_manifest(data, where)
        # Where each shard and each row group starts, in rows of the whole dataset.
        self._shard_starts = np.cumsum([0] + [s.rows for s in self.manifest.shards])
        self._group_starts = [np.cumsum((0,) + s.row_groups) for s in self.manifest.shards]
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.retries = 0
        """Reads that failed and were tried again (for tests and the benchmark)."""

    @property
    def total_rows(self) -> int:
        return int(self._shard_starts[-1])

    def shard_url(self, shard: int) -> str:
        return f"{self.url}/{self.manifest.shards[shard].name}"

    # --- where a row lives ------------------------------------------------------------------

    def locate(self, row: int) -> tuple[RowGroupRef, int]:
        """The row group holding global row `row`, and the row's index inside it."""
        shard = int(np.searchsorted(self._shard_starts, row, side="right")) - 1
        local = row - int(self._shard_starts[shard])
        starts = self._group_starts[shard]
        group = int(np.searchsorted(starts, local, side="right")) - 1
        return RowGroupRef(shard, group), local - int(starts[group])

    # --- reading ----------------------------------------------------------------------------

    def read_row_group(self, ref: RowGroupRef) -> np.ndarray:
        """The rows of one row group as a (rows, chunk_tokens) uint16 array, retried on read
        errors; a DatasetError if the content is wrong or the reads keep failing."""
        info = self.manifest.shards[ref.shard]
        try:
            return with_retries(lambda: self._read_once(ref, info),
                                f"read {info.name} row group {ref.row_group}",
                                attempts=READ_ATTEMPTS, retryable=self._retry_noted,
                                sleep=self._sleep)
        except DatasetError:
            raise
        except FileNotFoundError as e:
            raise DatasetError(f"shard {self.shard_url(ref.shard)} is missing") from e
        except Exception as e:  # noqa: BLE001 -- permanent, or retries ran out
            raise DatasetError(f"shard {self.shard_url(ref.shard)} cannot be read "
                               f"(row group {ref.row_group}): {_reason(e)} "
                               f"({type(e).__name__})") from e

    def _retry_noted(self, error: BaseException) -> bool:
        if _retryable(error):
            self.retries += 1
            self.close()  # the handle may be what broke: reopen on the next try
            return True
        return False

    def close(self) -> None:
        """Close the shard files held open (they are reopened when next read)."""
        while self._open:
            _close(self._open.popitem()[1])

    def _read_once(self, ref: RowGroupRef, info: ShardInfo) -> np.ndarray:
        pf = self._parquet(ref.shard)
        table = pf.read_row_group(ref.row_group, columns=[COLUMN])
        rows = self._decode(table, ref.shard)
        if len(rows) != info.row_groups[ref.row_group]:
            raise DatasetError(f"shard {self.shard_url(ref.shard)}: row group {ref.row_group} "
                               f"has {len(rows)} rows, {MANIFEST_NAME} says "
                               f"{info.row_groups[ref.row_group]}")
        return rows

    def _parquet(self, shard: int) -> pq.ParquetFile:
        pf = self._open.get(shard)
        if pf is not None:
            self._open.move_to_end(shard)
            return pf
        info = self.manifest.shards[shard]
        f = self._storage.fs.open(self._storage.path(info.name), "rb")
        try:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
        except pa.ArrowInvalid as e:
            f.close()
            raise DatasetError(f"shard {self.shard_url(shard)} is not a Parquet file: "
                               f"{_reason(e)}") from e
        except BaseException:
            f.close()
            raise
        try:
            self._check_layout(pf, shard)
        except BaseException:
            _close(pf)
            raise
        self._open[shard] = pf
        while len(self._open) > _OPEN_SHARDS:
            _close(self._open.popitem(last=False)[1])
        return pf

    def _check_layout(self, pf: pq.ParquetFile, shard: int) -> None:
        """The footer agrees with the manifest: the schema, and the rows per row group."""
        info = self.manifest.shards[shard]
        want = pa.list_(pa.uint16(), self.manifest.chunk_tokens)
        try:
            field = pf.schema_arrow.field(COLUMN)
        except KeyError:
            field = None
        if field is None or field.type != want:
            got = pf.schema_arrow.to_string().replace("\n", ", ")[:200]
            raise DatasetError(f"shard {self.shard_url(shard)} has schema ({got}); expected "
                               f"column '{COLUMN}': {want}")
        groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))
        if groups != info.row_groups:
            raise DatasetError(f"shard {self.shard_url(shard)} has {pf.metadata.num_rows} rows "
                               f"in {len(groups)} row groups; {MANIFEST_NAME} says "
                               f"{info.rows} in {len(info.row_groups)}")

    def _decode(self, table: pa.Table, shard: int) -> np.ndarray:
        column = table.column(COLUMN).combine_chunks()
        if column.null_count:
            raise DatasetError(f"shard {self.shard_url(shard)} has null rows")
        tokens = column.flatten().to_numpy(zero_copy_only=False)
        rows = tokens.reshape(len(column), self.manifest.chunk_tokens)
        if rows.size and int(rows.max()) >= self.manifest.vocab_size:
            raise DatasetError(f"shard {self.shard_url(shard)} holds token {int(rows.max())}, "
                               f"outside the dataset's vocabulary of "
                               f"{self.manifest.vocab_size}")
        return rows

    # --- checking the whole dataset ----------------------------------------------------------

    def check(self, *, checksums: bool = True,
              progress: Callable[[int, int, str], None] | None = None) -> None:
        """Every shard exists with the manifest's size, footer and (with `checksums`) xxh3-64
        checksum. Reads each shard whole when checksumming: for the preflight and
        `orchestrator data verify`, never for training."""
        fs = self._storage.fs
        for i, info in enumerate(self.manifest.shards):
            url = self.shard_url(i)
            path = self._storage.path(info.name)
            try:
                size = int(with_retries(lambda: fs.info(path), "stat shard",
                                        retryable=_retryable, sleep=self._sleep)["size"])
            except FileNotFoundError as e:
                raise DatasetError(f"shard {url} is missing") from e
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"shard {url} cannot be read: {_reason(e)} "
                                   f"({type(e).__name__})") from e
            if size != info.bytes:
                raise DatasetError(f"shard {url} is {size} bytes; {MANIFEST_NAME} says "
                                   f"{info.bytes} (truncated or replaced)")
            if checksums:
                digest = with_retries(lambda: self._hash(path), "checksum shard",
                                      retryable=_retryable, sleep=self._sleep)
                if digest != info.xxh3_64:
                    raise DatasetError(f"shard {url}: checksum {digest} differs from "
                                       f"{MANIFEST_NAME}'s {info.xxh3_64}")
            try:
                self._parquet(i)
            except DatasetError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"shard {url} cannot be read: {_reason(e)} "
                                   f"({type(e).__name__})") from e
            if progress is not None:
                progress(i + 1, len(self.manifest.shards), info.name)
        self.close()

    def _hash(self, path: str) -> str:
        h = xxhash.xxh3_64()
        with self._storage.fs.open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
        return h.hexdigest()
