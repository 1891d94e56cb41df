"""manifest.json: the commit marker of a checkpoint, and what it records.

A checkpoint exists if and only if its manifest exists and verifies. The manifest lists every
file of the save with its size and checksum, so a truncated, corrupted or missing file is
caught before DCP would load it (DCP loads corrupted bytes without complaint).

Format versions (readers migrate older ones forward, see `_MIGRATIONS`):
  1  DCP files directly in the step directory; CRC-32 checksums.
  2  DCP files in a per-save folder `data_dir` inside the step directory, so that a save can
     be written beside a committed one and replace it by swapping the manifest (overwrite);
     `parts` names what a partial checkpoint holds (an import holds the model only); the
     checksum is xxh3-64.
  3  `job_id`: the job that committed it (a restarted driver continues the same job), and
     `fencing_token`: the run's lease generation under which it was committed (0: none).
     The RNG states inside are tensors (the DCP files of versions 1 and 2 hold them pickled).
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Callable

import xxhash

FORMAT_VERSION = 3
# The hash catches accidental corruption, not tampering, so a fast one wins: it keeps
# checksumming a small fraction of a save. bench/hashes.py on 256 MiB here: crc32c 16.9 GB/s,
# xxh3-64 15.3, zlib CRC-32 4.0, blake3 3.2, SHA-256 1.7 (docs/benchmarks.md). crc32c is that
# fast only where the CPU has a CRC instruction its library uses, and needs one more
# dependency; xxh3 is within 10% of it and fast on every CPU (SIMD). CRC-32 stays readable
# for format-1 checkpoints.
HASH_ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """manifest.json cannot be parsed, or comes from a format version we cannot read."""


class FutureFormatError(ManifestError):
    """manifest.json comes from a newer orchestrator than this one."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    parallelism: str
    files: dict[str, FileEntry]
    """Every file of the save, by name relative to `data_dir`."""
    data_dir: str = ""
    """Folder of the save's files inside the step directory ("" is the step directory)."""
    metrics: dict[str, float] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)
    """Key prefixes the checkpoint holds when it is partial (an import); [] means complete."""
    format_version: int = FORMAT_VERSION
    job_id: str = ""
    """The job that committed it; a driver restarted after its predecessor died continues
    the same job (and so knows the job already committed its own checkpoint)."""
    fencing_token: int = 0
    """The run's lease generation the commit was made under (0: no lease)."""
    hash_algorithm: str = HASH_ALGORITHM
    torch_version: str = ""
    orchestrator_version: str = ""
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @staticmethod
    def from_json(data: bytes) -> "Manifest":
        try:
            raw: dict[str, Any] = json.loads(data)
            version = raw.get("format_version")
            if not isinstance(version, int) or version < 1:
                raise ManifestError(f"manifest format_version {version!r} is not a version")
            if version > FORMAT_VERSION:
                raise FutureFormatError(
                    f"manifest format_version {version} is newer than this orchestrator "
                    f"reads ({FORMAT_VERSION}); upgrade the orchestrator")
            raw = migrate(raw)
            check_names(raw)
            unknown = set(raw) - set(Manifest.__dataclass_fields__)
            if unknown:
                raise ManifestError(f"manifest.json has unknown fields {sorted(unknown)}")
            raw["files"] = {name: FileEntry(**entry) for name, entry in raw["files"].items()}
            if raw["hash_algorithm"] not in HASHERS:
                raise ManifestError(f"unknown hash algorithm {raw['hash_algorithm']!r}")
            return Manifest(**raw)
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"manifest.json is malformed: {e}") from e


_DATA_DIR = re.compile(r"^(save-[A-Za-z0-9_-]{1,64})?$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,200}$")


def is_plain_name(name: Any) -> bool:
    """A file name that stays in its folder when joined to it: no separators, not '.' or
    '..', not absolute."""
    return isinstance(name, str) and bool(_FILE_NAME.match(name)) and name not in (".", "..")


def check_names(raw: dict[str, Any]) -> None:
    """Names read from storage become paths: a crafted manifest must not lead a read or a
    delete out of the run's folder."""
    if not isinstance(raw.get("data_dir"), str) or not _DATA_DIR.match(raw["data_dir"]):
        raise ManifestError(f"manifest data_dir {raw.get('data_dir')!r} is not a save folder "
                            "name (save-<id>)")
    files = raw.get("files")
    if not isinstance(files, dict):
        raise ManifestError("manifest files must be a mapping of file names")
    for name in files:
        if not is_plain_name(name):
            raise ManifestError(f"manifest names the file {name!r}: not a plain file name")


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 1 kept the files in the step directory and always hashed with CRC-32.
    return {**raw, "data_dir": "", "parts": [], "hash_algorithm": raw.get("hash_algorithm", "crc32"),
            "format_version": 2}


def _v2_to_v3(raw: dict[str, Any]) -> dict[str, Any]:
    return {**raw, "job_id": "", "fencing_token": 0, "format_version": 3}


_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2,
                                                                       2: _v2_to_v3}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring a parsed manifest of any older version up to FORMAT_VERSION, one step at a time."""
    while raw["format_version"] < FORMAT_VERSION:
        raw = _MIGRATIONS[raw["format_version"]](raw)
    return raw


class _Crc32:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


HASHERS: dict[str, Callable[[], Any]] = {"xxh3_64": xxhash.xxh3_64, "crc32": _Crc32}


def new_hasher(algorithm: str = HASH_ALGORITHM) -> Any:
    """An object with update(bytes) and hexdigest()."""
    return HASHERS[algorithm]()


def checksum_stream(stream: BinaryIO, algorithm: str = HASH_ALGORITHM) -> tuple[int, str]:
    """(size, checksum) of everything readable from `stream`."""
    hasher, size = new_hasher(algorithm), 0
    while chunk := stream.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()
