"""Worker-side checkpointing: DCP saves and loads under the commit protocol of commit.py.

Every method is collective: all ranks call it in the same order with the same arguments.
Checkpoint collectives run on a gloo group of their own, so that they work under NCCL training
too (object collectives on NCCL need CUDA tensors) and so async saves can use it later without
deadlocking the training group.
"""

from __future__ import annotations

import pickle
import random
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.stateful import Stateful

import orchestrator
from orchestrator.chaos import FaultInjector
from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import Manifest, ManifestError
from orchestrator.errors import CheckpointError

Emit = Callable[..., None]


class RankRng(Stateful):
    """This rank's RNG states, saved under a rank-unique key.

    DCP treats a key present on every rank as replicated and keeps one copy, which would
    silently give every rank rank 0's RNG on resume.
    """

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            # Python's and numpy's states are nested tuples; pickled bytes keep DCP from
            # flattening them into dozens of entries.
            "python_numpy": pickle.dumps((random.getstate(), np.random.get_state())),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        py_state, np_state = pickle.loads(state["python_numpy"])
        random.setstate(py_state)
        np.random.set_state(np_state)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, *, layout: RunLayout, rank: int, world_size: int, parallelism: str,
                 group: dist.ProcessGroup, faults: FaultInjector, emit: Emit) -> None:
        self._layout = layout
        self._rank = rank
        self._world_size = world_size
        self._parallelism = parallelism
        self._group = group
        self._faults = faults
        self._emit = emit

    # --- restore ---------------------------------------------------------------------------

    def restore(self, state: dict[str, Any], candidates: list[int]) -> int:
        """Load the newest candidate whose files verify; return its step, or 0 if none.

        A candidate that fails verification is skipped loudly (an event names the file) and
        the next older one is tried.
        """
        for step in candidates:
            t0 = time.monotonic()
            manifest, problems = self._verify(step)
            if problems:
                if self._rank == 0:
                    self._emit("checkpoint_invalid", step=step, problems=problems)
                continue
            verify_s = time.monotonic() - t0
            saved_world = manifest.world_size
            # A rank that did not exist when the checkpoint was taken has no RNG state in
            # it: it keeps the one it was seeded with (the world size changed: elastic).
            to_load = self._with_rng(state) if self._rank < saved_world else dict(state)
            dcp.load(to_load, storage_reader=self._reader(step), process_group=self._group)
            if self._rank == 0:
                self._emit("checkpoint_restored", step=step, saved_world_size=saved_world,
                           world_size=self._world_size, verify_s=round(verify_s, 3),
                           load_s=round(time.monotonic() - t0 - verify_s, 3))
            return step
        return 0

    def _verify(self, step: int) -> tuple[Manifest | None, list[str]]:
        """Every rank checks its share of the files; all ranks see all problems."""
        manifest = None
        try:
            manifest = commit.read_manifest(self._layout, step)
            mine = commit.share_of(sorted(manifest.files), self._rank, self._world_size)
            problems = commit.verify_files(self._layout, manifest, mine)
        except (ManifestError, OSError) as e:
            problems = [f"rank {self._rank}: {e}"]
        gathered: list[list[str]] = [[] for _ in range(self._world_size)]
        dist.all_gather_object(gathered, problems, group=self._group)
        return manifest, sorted({p for share in gathered for p in share})

    # --- save ------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write `state` as the checkpoint of `step` and commit it."""
        t0 = time.monotonic()
        self._prepare_fresh_dir(step)
        dcp.save(self._with_rng(state), storage_writer=self._writer(step),
                 process_group=self._group)
        written_s = time.monotonic() - t0
        self._faults.on_shards_written(step)

        # Spread checksumming over the ranks; the gather is where every rank confirms.
        names = commit.data_files(self._layout, step)
        mine = commit.checksum_files(
            self._layout, step, commit.share_of(names, self._rank, self._world_size))
        shares: list[dict] = [{} for _ in range(self._world_size)]
        dist.all_gather_object(shares, mine, group=self._group)
        if self._rank != 0:
            return
        files = {name: entry for share in shares for name, entry in share.items()}
        missing = set(names) - set(files)
        assert not missing, f"files not checksummed by any rank: {sorted(missing)}"
        manifest = Manifest(
            step=step, world_size=self._world_size, parallelism=self._parallelism, files=files,
            metrics={k: float(v) for k, v in metrics.items()},
            torch_version=torch.__version__, orchestrator_version=orchestrator.__version__,
        )
        commit.write_manifest(self._layout, manifest)
        self._emit("checkpoint_committed", step=step, bytes=manifest.total_bytes,
                   write_s=round(written_s, 3), total_s=round(time.monotonic() - t0, 3))

    def _prepare_fresh_dir(self, step: int) -> None:
        """DCP must never write into an existing directory: a stale .metadata beside new
        shards can load silently as a mix of two steps."""
        error = None
        if self._rank == 0:
            storage, step_dir = self._layout.storage, self._layout.step_dir(step)
            if storage.exists(*self._layout.manifest(step)):
                error = (f"step {step} already has a committed checkpoint in "
                         f"{storage.url_of(*step_dir)}; refusing to overwrite it")
            elif storage.exists(*step_dir):
                storage.remove_tree(*step_dir)  # debris of an interrupted save
                self._emit("checkpoint_debris_removed", step=step)
        box = [error]
        dist.broadcast_object_list(box, src=0, group=self._group)
        if box[0]:
            raise CheckpointError(box[0])

    def agree_max(self, value: int) -> int:
        """The largest `value` over all ranks (a small collective on the checkpoint group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.item())

    # --- plumbing --------------------------------------------------------------------------

    def _with_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, f"rng_rank{self._rank}": RankRng()}

    def _writer(self, step: int):
        storage = self._layout.storage
        if storage.is_local:
            return FileSystemWriter(storage.path(*self._layout.step_dir(step)), sync_files=True)
        # FsspecWriter's sync_files calls os.sync() on the whole host: pointless for S3.
        return FsspecWriter(storage.url_of(*self._layout.step_dir(step)), sync_files=False)

    def _reader(self, step: int):
        storage = self._layout.storage
        if storage.is_local:
            return FileSystemReader(storage.path(*self._layout.step_dir(step)))
        return FsspecReader(storage.url_of(*self._layout.step_dir(step)))
