"""Do the driver and every rank reach the same storage? Checked at the start of each attempt.

A local `run.storage` (the default `./runs`) on a multi-node cluster names a folder on each
node's own disk: every rank would write its shards where no other rank, no later restore on
another node, and no driver on the head can read them. The commit check
(manager._complete) refuses such a save, but only at the first save; this probe refuses the
run before it trains:

  1. the driver writes `<run>/probes/<token>/driver.json` and hands the token to the
     workers in the attempt's spec;
  2. every rank writes `rank-<r>.json` beside it; rank 0 lists the folder and must see every
     rank's probe, and every rank must read the driver's;
  3. the ranks share what they saw, so that every rank raises the same StorageNotShared
     (the driver stops the job at once, exit 2), or none does.

O(1) storage operations per rank and one listing on rank 0, so it stays cheap at any size.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import torch.distributed as dist

from orchestrator.checkpoint.describe import few
from orchestrator.checkpoint.layout import PROBES, RunLayout
from orchestrator.errors import StorageFailure, StorageNotShared

log = logging.getLogger(__name__)

LISTING_PATIENCE_S = 3.0
"""How long rank 0 looks again for probes it does not see yet: an NFS client caches folder
listings for a few seconds, and a shared filesystem must not be mistaken for a local one."""

DRIVER = "driver.json"


def write_driver_probe(layout: RunLayout) -> str:
    """The driver's half (step 1): write its probe and return the token for the workers.
    "" when it cannot be written: the workers then check each other only (the preflight
    found the storage writable, and the driver's own writes retry)."""
    token = uuid.uuid4().hex
    body = {"host": socket.gethostname(), "pid": os.getpid(), "token": token}
    try:
        layout.storage.makedirs(layout.run_name, PROBES, token)
        layout.storage.write_atomic(json.dumps(body).encode(), layout.run_name, PROBES, token,
                                    DRIVER)
    except OSError as e:
        log.warning("the storage probe for this attempt could not be written (%s); the "
                    "workers check each other only", type(e).__name__)
        return ""
    return token


def check_shared_storage(layout: RunLayout, rank: int, world_size: int,
                         group: dist.ProcessGroup | None, driver_token: str = "") -> None:
    """The workers' half (steps 2-3), collective over `group`: raise StorageNotShared on
    every rank if any rank's probe, or the driver's, is out of another's sight; return on
    every rank otherwise. Without `driver_token` (no driver: tests, benchmarks) rank 0
    picks the token and the ranks read rank 0's probe instead of the driver's."""
    token = [driver_token or (uuid.uuid4().hex if rank == 0 else "")]
    if not driver_token:
        dist.broadcast_object_list(token, src=0, group=group)
    folder = (layout.run_name, PROBES, token[0])
    host = socket.gethostname()
    wrote = ""
    try:
        layout.storage.makedirs(*folder)
        layout.storage.write_atomic(json.dumps({"rank": rank, "host": host, "token": token[0]})
                                    .encode(), *folder, _name(rank))
    except OSError as e:
        wrote = _describe(e)
    hosts: list[Any] = [None] * world_size
    dist.all_gather_object(hosts, (host, wrote), group=group)  # every probe is written now

    unseen: list[int] = []
    sees_driver, error = True, ""
    try:
        if rank == 0:
            unseen = _unseen_by_rank0(layout, folder, world_size, hosts)
        if driver_token:
            sees_driver = _sees(layout, (*folder, DRIVER), token[0])
        elif rank != 0 and not hosts[0][1]:
            unseen = [] if _sees(layout, (*folder, _name(0)), token[0]) else [0]
    except OSError as e:
        error = _describe(e)
    views: list[Any] = [None] * world_size
    dist.all_gather_object(views, (unseen, sees_driver, error), group=group)
    try:
        layout.storage.remove_file(*folder, _name(rank))
        if rank == 0:
            layout.storage.remove_tree(*folder)
    except OSError:
        pass  # a probe left behind is a few bytes, removed at the next job start or by gc

    failed = [f"rank {r} ({hosts[r][0]}) cannot write its probe: {hosts[r][1]}"
              for r in range(world_size) if hosts[r][1]]
    failed += [f"rank {r} ({hosts[r][0]}) cannot read the probes: {error}"
               for r, (_, _, error) in enumerate(views) if error]
    if failed:
        # The storage failed (full, forbidden, S3 errors after retries): that proves nothing
        # about sharing, and it may pass; a storage_error, with its restart budget.
        raise StorageFailure(f"run.storage {layout.storage.as_written} failed the start-up "
                             f"probe: {few(failed, '; ')}")
    problems = [f"rank {r} ({hosts[r][0]}) does not see the probes of {_ranks(missing, hosts)}"
                for r, (missing, _, _) in enumerate(views) if missing]
    blind = [r for r, (_, sees, _) in enumerate(views) if not sees]
    if blind:
        problems.append(f"{_ranks(blind, hosts)} do{'es' * (len(blind) == 1)} not see what "
                        "the driver wrote")
    if problems:
        # The advice first: a failure is shown as its first 300 characters.
        raise StorageNotShared(
            f"run.storage {layout.storage.as_written} is not shared by every rank (each node "
            "writes to its own disk): use S3 or a filesystem every node mounts (NFS, Lustre, "
            f"a shared volume); {few(problems, '; ')}")


def _unseen_by_rank0(layout: RunLayout, folder: tuple[str, ...], world_size: int,
                     hosts: list[Any]) -> list[int]:
    expected = {_name(r): r for r in range(world_size) if not hosts[r][1]}
    deadline = time.monotonic() + LISTING_PATIENCE_S
    while True:
        seen = {f.name for f in layout.storage.list_dir(*folder)}
        unseen = sorted(r for name, r in expected.items() if name not in seen)
        if not unseen or time.monotonic() > deadline:
            return unseen
        time.sleep(0.5)


def _sees(layout: RunLayout, path: tuple[str, ...], token: str) -> bool:
    """Whether the probe at `path` is there and is this attempt's (read as untrusted)."""
    try:
        found = json.loads(layout.storage.read_bytes(*path))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(found, dict) and found.get("token") == token


def _name(rank: int) -> str:
    return f"rank-{rank}.json"


def _describe(e: OSError) -> str:
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"[:300]


def _ranks(ranks: list[int], hosts: list[Any]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + few([f"{r} ({hosts[r][0]})"
                                                             for r in ranks])
