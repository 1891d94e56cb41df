"""`dataset.json`: what a prepared token dataset holds, read as untrusted input.

    <dataset>/
      dataset.json            written last: a dataset exists once its manifest does
      shard-00000.parquet     one column `tokens`: fixed_size_list<uint16>[chunk_tokens]
      shard-00001.parquet     ...

A shard's rows are consecutive chunks of one token stream (documents joined by an
end-of-document token). The manifest names every shard with its rows, its row groups, its size
and its xxh3-64 checksum, so a reader can plan reads without opening the shards and can tell a
changed or truncated shard from a good one.

Whoever can write the dataset's folder can write this file too: it is JSON, parsed into plain
values, every field checked for type and range, and every shard name checked to be a plain
file name before it is joined into a path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import xxhash

from orchestrator.errors import DatasetError

MANIFEST_NAME = "dataset.json"
FORMAT = "orchestrator.tokens"
FORMAT_VERSION = 1
COLUMN = "tokens"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.parquet$")
_HEX64 = re.compile(r"^[0-9a-f]{16}$")
# Bounds that keep a crafted manifest from making a reader allocate absurd amounts.
MAX_CHUNK_TOKENS = 1 << 20
MAX_VOCAB = 1 << 16  # tokens are uint16
MAX_SHARDS = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    row_groups: tuple[int, ...]
    """Rows in each row group, in order; they add up to `rows`."""
    bytes: int
    xxh3_64: str


@dataclass(frozen=True)
class DatasetManifest:
    vocab_size: int
    eod_token: int
    chunk_tokens: int
    tokenizer: str
    shards: tuple[ShardInfo, ...]

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def fingerprint(self) -> int:
        """A 63-bit digest of what decides the samples: saved with the data position, so a
        resume on other data is caught instead of silently reading other samples."""
        h = xxhash.xxh3_64()
        h.update(f"{self.chunk_tokens}|{self.vocab_size}|{self.eod_token}".encode())
        for s in self.shards:
            h.update(f"|{s.name}:{s.rows}:{s.xxh3_64}".encode())
        return h.intdigest() >> 1  # fits a signed int64 tensor

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "column": COLUMN,
            "dtype": "uint16", "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
            "eod_token": self.eod_token, "chunk_tokens": self.chunk_tokens,
            "hash_algorithm": "xxh3_64",
            "shards": [{"name": s.name, "rows": s.rows, "row_groups": list(s.row_groups),
                        "bytes": s.bytes, "xxh3_64": s.xxh3_64} for s in self.shards],
        }, indent=1).encode()


def _int(raw: dict, key: str, low: int, high: int, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DatasetError(f"{where}: '{key}' must be an integer from {low} to {high}, "
                           f"got {value!r}")
    return value


def parse_manifest(data: bytes, where: str) -> DatasetManifest:
    """Validate the bytes of a `dataset.json`; `where` (its URL) prefixes every message."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{where}: not a dataset manifest (invalid JSON: {e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DatasetError(f"{where}: not a dataset manifest (no \"format\": \"{FORMAT}\"); "
                           "make one with `orchestrator data prepare`")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{where}: format_version {version!r}; this orchestrator reads "
                           f"version {FORMAT_VERSION}")
    if raw.get("column") != COLUMN or raw.get("dtype") != "uint16":
        raise DatasetError(f"{where}: expects column {COLUMN!r} of dtype uint16, the manifest "
                           f"says {raw.get('column')!r} of {raw.get('dtype')!r}")
    vocab = _int(raw, "vocab_size", 2, MAX_VOCAB, where)
    eod = _int(raw, "eod_token", 0, vocab - 1, where)
    chunk = _int(raw, "chunk_tokens", 2, MAX_CHUNK_TOKENS, where)
    tokenizer = raw.get("tokenizer")
    if not isinstance(tokenizer, str):
        raise DatasetError(f"{where}: 'tokenizer' must be a string")
    shards_raw = raw.get("shards")
    if not isinstance(shards_raw, list) or not 1 <= len(shards_raw) <= MAX_SHARDS:
        raise DatasetError(f"{where}: 'shards' must be a list of 1 to {MAX_SHARDS} shards")
    shards, seen = [], set()
    for i, s in enumerate(shards_raw):
        at = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise DatasetError(f"{at} must be a mapping")
        name = s.get("name")
        # A name becomes a path: no separators, no '..', nothing absolute.
        if not isinstance(name, str) or not _SHARD_NAME.match(name) or ".." in name:
            raise DatasetError(f"{at}: shard name {name!r} is not a plain file name "
                               "ending in .parquet")
        if name in seen:
            raise DatasetError(f"{at}: shard {name!r} is listed twice")
        seen.add(name)
        rows = _int(s, "rows", 1, 1 << 40, at)
        groups = s.get("row_groups")
        if (not isinstance(groups, list) or not groups
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1
                           for g in groups) or sum(groups) != rows):
            raise DatasetError(f"{at}: 'row_groups' must list positive row counts adding up "
                               f"to rows={rows}")
        size = _int(s, "bytes", 1, 1 << 50, at)
        digest = s.get("xxh3_64")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise DatasetError(f"{at}: 'xxh3_64' must be 16 hex digits")
        shards.append(ShardInfo(name=name, rows=rows, row_groups=tuple(groups), bytes=size,
                                xxh3_64=digest))
    return DatasetManifest(vocab_size=vocab, eod_token=eod, chunk_tokens=chunk,
                           tokenizer=tokenizer, shards=tuple(shards))
