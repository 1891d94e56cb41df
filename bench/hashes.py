"""Hash throughput: the checksums a checkpoint could carry, on the same buffer, side by side.

The table behind the choice of xxh3-64 for checkpoint files (orchestrator/checkpoint/
manifest.py). The checksum catches accidental corruption (a torn write, a flipped bit, a
truncated upload), not tampering (the trust model of DESIGN.md handles that), so the
fastest hash with good dispersion wins. Each algorithm hashes the same random buffer in 8 MiB
chunks, as the checkpoint writer does (it hashes what it writes, as it writes it); best and
median of a few rounds, the algorithms' order rotated from round to round.

    python bench/hashes.py              # 256 MiB, 5 rounds: about a minute here
    python bench/hashes.py --mib 64     # quicker

Algorithms whose library is not installed (crc32c, blake3: `pip install -e .[bench]`) are
listed as skipped. Writes bench/results/hashes.json and prints the table of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import statistics
import time
import zlib
from pathlib import Path
from typing import Callable

import xxhash

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 8 << 20


def _optional(module: str, name: str) -> Callable[..., object] | None:
    """`module.name`, or None where the module is not installed."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


class _Crc:
    """A hashlib-like object over a running CRC function."""

    def __init__(self, fn: Callable[[bytes, int], int]) -> None:
        self._fn, self._value = fn, 0

    def update(self, data) -> None:
        self._value = self._fn(data, self._value)


def _crc32c() -> Callable[[], object] | None:
    fn = _optional("crc32c", "crc32c")
    return None if fn is None else (lambda: _Crc(fn))


ALGORITHMS: dict[str, Callable[[], Callable[[], object] | None]] = {
    "xxh3_64 (ours)": lambda: xxhash.xxh3_64,
    "xxh3_128": lambda: xxhash.xxh3_128,
    "xxh64": lambda: xxhash.xxh64,
    "crc32c": _crc32c,
    "zlib crc32 (format v1)": lambda: (lambda: _Crc(zlib.crc32)),
    "blake3": lambda: _optional("blake3", "blake3"),
    "blake2b": lambda: hashlib.blake2b,
    "md5": lambda: hashlib.md5,
    "sha256": lambda: hashlib.sha256,
}


def seconds_to_hash(new: Callable[[], object], view: memoryview) -> float:
    hasher = new()
    t0 = time.perf_counter()
    for offset in range(0, len(view), CHUNK):
        hasher.update(view[offset:offset + CHUNK])
    return time.perf_counter() - t0


def run(mib: int, rounds: int) -> dict:
    view = memoryview(os.urandom(mib << 20))
    available = {name: make() for name, make in ALGORITHMS.items()}
    skipped = sorted(name for name, new in available.items() if new is None)
    names = [name for name, new in available.items() if new is not None]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(seconds_to_hash(available[name], view))
    return {"mib": mib, "rounds": rounds, "chunk_bytes": CHUNK, "seconds": seconds,
            "skipped": skipped}


def table(r: dict) -> str:
    size_gb = (r["mib"] << 20) / 1e9
    lines = [f"{r['mib']} MiB of random bytes in {r['chunk_bytes'] >> 20} MiB chunks, "
             f"{r['rounds']} rounds (order rotated).", "",
             "| hash | median GB/s | best GB/s | speed against xxh3_64 (medians) |",
             "|---|---|---|---|"]
    ours = statistics.median(r["seconds"]["xxh3_64 (ours)"])
    rows = sorted(r["seconds"].items(), key=lambda kv: statistics.median(kv[1]))
    for name, secs in rows:
        median = statistics.median(secs)
        lines.append(f"| {name} | {size_gb / median:.2f} | {size_gb / min(secs):.2f} | "
                     f"{ours / median:.2f} |")
    if r["skipped"]:
        lines += ["", "Not installed, skipped: " + ", ".join(r["skipped"]) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hashes.json"))
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the results already in --out; run nothing")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.mib < 1 or args.rounds < 1:
        parser.error("--mib and --rounds must be at least 1")
    results = run(args.mib, args.rounds)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
