"""`orchestrator data prepare`: a small real corpus, with no download.

The text is the Python standard library's own source files, which every machine that runs the
orchestrator has. Tokens are bytes (0-255) plus an end-of-document token (256); the stream is
cut into rows of `chunk_tokens` tokens and written as Parquet shards (zstd, page checksums),
then `dataset.json` last, so a half-written dataset is never taken for one.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from orchestrator.checkpoint.storage import Storage
from orchestrator.data.manifest import COLUMN, MANIFEST_NAME, DatasetManifest, ShardInfo
from orchestrator.errors import DatasetError

EOD_TOKEN = 256
VOCAB_SIZE = 257


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, tests and third-party packages left out, in a fixed
    order (by path), so that the same Python makes the same corpus."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def byte_tokens(files: list[Path], max_tokens: int) -> tuple[np.ndarray, int]:
    """Each file's bytes, then EOD, until `max_tokens` tokens; and how many files that took."""
    pieces, total = [], 0
    for path in files:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        doc = np.append(data, np.uint16(EOD_TOKEN))
        pieces.append(doc[:max_tokens - total])
        total += len(pieces[-1])
        if total >= max_tokens:
            break
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)), len(pieces)


def shard_bytes(rows: np.ndarray, row_group_rows: int) -> bytes:
    chunk_tokens = rows.shape[1]
    values = pa.array(rows.reshape(-1), type=pa.uint16())
    column = pa.FixedSizeListArray.from_arrays(values, chunk_tokens)
    table = pa.table({COLUMN: column})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd",
                   write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def prepare(out_url: str, *, max_bytes: int = 4_000_000, chunk_tokens: int = 1025,
            rows_per_shard: int = 512, row_group_rows: int = 32, source: Path | None = None,
            progress: Callable[[str], None] = lambda line: None) -> DatasetManifest:
    """Write the corpus to `out_url`; refuses a folder that already holds a dataset."""
    for name, value, low in (("max_bytes", max_bytes, 1), ("chunk_tokens", chunk_tokens, 2),
                             ("rows_per_shard", rows_per_shard, 1),
                             ("row_group_rows", row_group_rows, 1)):
        if value < low:
            raise DatasetError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    storage = Storage(out_url)
    if storage.exists(MANIFEST_NAME):
        raise DatasetError(f"{storage.url_of(MANIFEST_NAME)} exists already: prepare into a "
                           "new folder (a dataset is never rewritten in place)")
    files = stdlib_sources(source)
    if not files:
        raise DatasetError(f"no .py files found under {source}")
    tokens, used = byte_tokens(files, max_bytes)
    n_rows = len(tokens) // chunk_tokens
    if n_rows < 1:
        raise DatasetError(f"--max-bytes {max_bytes} gives fewer than one row of "
                           f"{chunk_tokens} tokens")
    rows = tokens[:n_rows * chunk_tokens].reshape(n_rows, chunk_tokens)
    progress(f"{used} of {len(files)} source files read: {n_rows} rows of {chunk_tokens} "
             "tokens")
    storage.makedirs()
    shards = []
    n_shards = -(-n_rows // rows_per_shard)
    for i in range(n_shards):
        part = rows[i * rows_per_shard:(i + 1) * rows_per_shard]
        data = shard_bytes(part, row_group_rows)
        name = f"shard-{i:05d}.parquet"
        storage.write_atomic(data, name)
        groups = [min(row_group_rows, len(part) - g) for g in range(0, len(part), row_group_rows)]
        shards.append(ShardInfo(name=name, rows=len(part), row_groups=tuple(groups),
                                bytes=len(data), xxh3_64=xxhash.xxh3_64_hexdigest(data)))
        progress(f"shard {i + 1}/{n_shards} written: {name}, {len(part)} rows, "
                 f"{len(data) / 1e6:.2f} MB")
    manifest = DatasetManifest(vocab_size=VOCAB_SIZE, eod_token=EOD_TOKEN,
                               chunk_tokens=chunk_tokens, tokenizer="bytes",
                               shards=tuple(shards))
    storage.write_atomic(manifest.to_json(), MANIFEST_NAME)  # last: the commit
    return manifest
