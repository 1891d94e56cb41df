"""`orchestrator data prepare|verify`: make and check a token dataset.

    orchestrator data prepare ./corpus [--max-bytes 4000000] [--chunk-tokens 1025]
    orchestrator data verify  ./corpus          # every shard against dataset.json

Exit codes: 0 done, 1 the dataset is bad (verify), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import DatasetError, StorageError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="prepare and verify token datasets")
    actions = data.add_subparsers(dest="action", required=True)
    prep = actions.add_parser("prepare", help="a byte-level corpus of the Python standard "
                                              "library's source, as Parquet shards")
    prep.add_argument("out_url", help="a new folder: local path, file:// or s3:// URL")
    prep.add_argument("--max-bytes", type=int, default=4_000_000,
                      help="tokens (bytes of text) to take, at most (default 4000000)")
    prep.add_argument("--chunk-tokens", type=int, default=1025,
                      help="tokens per row; a sample of seq_len+1 tokens lies inside one row, "
                           "so seq_len can be up to this minus 1 (default 1025)")
    prep.add_argument("--rows-per-shard", type=int, default=512)
    prep.add_argument("--row-group-rows", type=int, default=32,
                      help="rows per Parquet row group, the unit a rank reads (default 32)")
    prep.add_argument("--source", type=Path, default=None,
                      help="a folder of .py files instead of the standard library")
    verify = actions.add_parser("verify", help="check every shard against dataset.json")
    verify.add_argument("url")
    verify.add_argument("--size-only", action="store_true",
                        help="sizes and Parquet footers only, no checksums")


def _progress(line: str) -> None:
    print(f"orchestrator: {line}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from orchestrator.data.dataset import TokenDataset
    from orchestrator.data.prepare import prepare

    t0 = time.monotonic()
    if args.action == "prepare":
        try:
            m = prepare(args.out_url, max_bytes=args.max_bytes, chunk_tokens=args.chunk_tokens,
                        rows_per_shard=args.rows_per_shard, row_group_rows=args.row_group_rows,
                        source=args.source, progress=_progress)
        except (DatasetError, StorageError, OSError) as e:
            print(f"orchestrator: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"orchestrator: dataset {args.out_url.rstrip('/')}: {len(m.shards)} shards, "
              f"{m.total_rows} rows of {m.chunk_tokens} tokens, vocabulary {m.vocab_size}, "
              f"{m.total_bytes / 1e6:.1f} MB, in {time.monotonic() - t0:.1f} s")
        return EXIT_OK
    try:
        dataset = TokenDataset(args.url)
    except DatasetError as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        dataset.check(checksums=not args.size_only,
                      progress=lambda i, n, name: _progress(f"shard {i}/{n} ok: {name}"))
    except DatasetError as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    m = dataset.manifest
    print(f"orchestrator: dataset {dataset.url}: {len(m.shards)} shards, {m.total_rows} rows, "
          f"all {'sizes' if args.size_only else 'checksums'} match dataset.json")
    return EXIT_OK
