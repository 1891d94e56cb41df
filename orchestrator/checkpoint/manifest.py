"""manifest.json: the commit marker of a checkpoint, and what it records.

A checkpoint exists if and only if its manifest exists and verifies. The manifest lists every
file of the step directory with its size and checksum, so a truncated, corrupted or missing
file is caught before DCP would load it (DCP loads corrupted bytes without complaint).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

FORMAT_VERSION = 1
# zlib's CRC-32 hashes at 4.2 GB/s on this machine against 1.8 GB/s for SHA-256 (measured on
# 256 MiB): it is for catching accidental corruption, not tampering, and keeps verification a
# small fraction of a save. The manifest names the algorithm so it can change later.
HASH_ALGORITHM = "crc32"
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """manifest.json cannot be parsed, or comes from a format version we cannot read."""


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
    metrics: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
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
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise ManifestError(
                    f"manifest format_version {version!r} is newer than this orchestrator "
                    f"reads ({FORMAT_VERSION}); upgrade the orchestrator")
            raw["files"] = {name: FileEntry(**entry) for name, entry in raw["files"].items()}
            return Manifest(**raw)
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"manifest.json is malformed: {e}") from e


def checksum_stream(stream: BinaryIO) -> tuple[int, str]:
    """(size, checksum) of everything readable from `stream`."""
    crc, size = 0, 0
    while chunk := stream.read(_CHUNK):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return size, f"{crc:08x}"
