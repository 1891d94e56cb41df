"""Worker-side restore: the one path that reads a checkpoint's tensors back into a run.

The first candidate of the restore plan whose files verify against its manifest is loaded
through DCP with the allow-listed reader and planner of safe_load.py (nothing read from
storage is unpickled but through them; `ckpt show`, `ckpt export` and `ckpt verify` read
through the same reader). Collective: every rank calls `restore` with the same plan, and
every rank takes the same decision about each candidate:
  - files that read whole and wrong: proof; marked invalid (never deleted), next candidate;
  - reads that fail: no proof; left as they are, next candidate, and if no candidate could
    be read, StorageFailure (the driver retries once storage answers);
  - content that is not tensors and plain data: refused, marked invalid, next candidate.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.stateful import Stateful

from orchestrator.checkpoint import commit, housekeeping
from orchestrator.checkpoint.describe import describe_error, few
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import Manifest, ManifestError
from orchestrator.checkpoint.safe_load import SafeLoadPlanner, is_refusal, legacy_rng_state
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.checkpoint.snapshot import plain_state
from orchestrator.checkpoint.writer import reader
from orchestrator.errors import CheckpointError, StorageFailure

Emit = Callable[..., None]
log = logging.getLogger(__name__)
RNG_PREFIX = "rng_rank"


def with_rng(rank: int, state: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
    """`state` and this rank's RNG states, as saved and restored."""
    return {**state, f"{RNG_PREFIX}{rank}": RankRng(legacy)}


class RankRng(Stateful):
    """This rank's RNG states, saved under a rank-unique key.

    DCP treats a key present on every rank as replicated and keeps one copy, which would
    silently give every rank rank 0's RNG on resume. Every state is a tensor: nothing from
    a checkpoint is unpickled (checkpoint/safe_load.py). `legacy=True` reads the pickled
    `python_numpy` bytes of format-1/2 checkpoints, through an allow-list.
    """

    def __init__(self, legacy: bool = False) -> None:
        self._legacy = legacy

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self._legacy:
            state["python_numpy"] = b""  # a placeholder DCP fills with the saved bytes
        else:
            version, internal, gauss = random.getstate()
            kind, key, pos, has_gauss, cached = np.random.get_state()
            assert kind == "MT19937", kind
            state.update({
                # Through numpy: torch.tensor of a 625-int list takes 50 us, this 10.
                "python": torch.from_numpy(np.array((version, *internal), dtype=np.int64)),
                "python_gauss": torch.tensor([gauss is not None, gauss or 0.0],
                                             dtype=torch.float64),
                "numpy": torch.from_numpy(np.append(key.astype(np.int64), [pos, has_gauss])),
                "numpy_gauss": torch.tensor(cached, dtype=torch.float64),
            })
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "python_numpy" in state:
            py_state, np_state = legacy_rng_state(state["python_numpy"])
        else:
            version, *internal = (int(v) for v in state["python"].tolist())
            has_gauss, gauss = state["python_gauss"].tolist()
            py_state = (version, tuple(internal), gauss if has_gauss else None)
            words = state["numpy"].numpy()
            np_state = ("MT19937", words[:-2].astype(np.uint32), int(words[-2]),
                        int(words[-1]), float(state["numpy_gauss"]))
        random.setstate(py_state)
        np.random.set_state(np_state)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class _PartialLoadPlanner(SafeLoadPlanner):
    """Loads only the keys `keep` accepts that the checkpoint has; the rest of the state keeps
    its current values."""

    def __init__(self, keep: Callable[[str], bool]) -> None:
        super().__init__(allow_partial_load=True)
        self._keep = keep

    def create_local_plan(self) -> LoadPlan:
        # Filtered here rather than in set_up_planner: the base class's create_local_plan
        # re-flattens the whole state when the checkpoint has keys the state lacks (its
        # guess at a pre-2.4 checkpoint), which would undo the selection.
        have = self.metadata.state_dict_metadata
        self.state_dict = {k: v for k, v in self.state_dict.items()
                           if self._keep(k) and k in have}
        return create_default_local_load_plan(self.state_dict, self.metadata, False)


def _under(key: str, parts: list[str]) -> bool:
    return not parts or any(key == p or key.startswith(p + ".") for p in parts)


class Restorer:
    def __init__(self, *, layout: RunLayout, rank: int, world_size: int,
                 group: dist.ProcessGroup, emit: Emit) -> None:
        self._layout = layout
        self._rank = rank
        self._world_size = world_size
        self._group = group
        self._emit = emit

    def restore(self, state: dict[str, Any], plan: RestorePlan) -> int:
        """Load the first candidate whose files verify; return its step, or 0 if none.

        A candidate that fails verification is skipped loudly (an event names the file, and
        the checkpoint is marked invalid) and the next one is tried; so is one that holds
        something other than tensors and plain data (`checkpoint_refused`: never loaded).
        """
        cannot_read: list[str] = []
        for step in plan.candidates:
            t0 = time.monotonic()
            manifest, mismatched, unreadable = self._verify(step)
            if mismatched:  # read whole and wrong: proof, so it is marked (never deleted)
                if self._rank == 0:
                    self._emit("checkpoint_invalid", step=step, problems=mismatched)
                    housekeeping.mark_invalid(self._layout, step, mismatched)
                continue
            if unreadable:  # reads failed: no proof; skipped for now and left as it is
                if self._rank == 0:
                    log.warning("checkpoint of step %d cannot be read now, trying an older "
                                "one: %s", step, "; ".join(unreadable))
                    self._emit("checkpoint_unreadable", step=step, problems=unreadable)
                cannot_read.append(f"step {step}: {unreadable[0]}")
                continue
            verify_s = time.monotonic() - t0
            refused = self._load_or_refuse(step, manifest, state, plan)
            if refused:
                if self._rank == 0:
                    log.error("checkpoint of step %d refused: %s", step, refused)
                    self._emit("checkpoint_refused", step=step, reason=refused)
                    housekeeping.mark_invalid(self._layout, step, [refused])
                continue
            if self._rank == 0:
                self._emit("checkpoint_restored", step=step,
                           saved_world_size=manifest.world_size, world_size=self._world_size,
                           saved_parallelism=manifest.parallelism,
                           parts=manifest.parts or plan.parts, bytes=manifest.total_bytes,
                           verify_s=round(verify_s, 3),
                           load_s=round(time.monotonic() - t0 - verify_s, 3))
            return step
        if cannot_read:
            # Starting from scratch beside checkpoints that may be good would lose them all:
            # a storage failure, retried by the driver (its own budget) once storage is back.
            raise StorageFailure(f"no committed checkpoint can be read now ({'; '.join(cannot_read[:3])}); "
                                 "retrying from the latest when the storage answers")
        if plan.required:
            raise CheckpointError(
                f"checkpoint.restore: none of steps {plan.candidates} in "
                f"{self._layout.storage.url_of(*self._layout.checkpoints)} could be restored "
                "(see the checkpoint_invalid events)")
        return 0

    def _load_or_refuse(self, step: int, manifest: Manifest, state: dict[str, Any],
                        plan: RestorePlan) -> str:
        """Load `step`; return "" when done, or why it was refused as unsafe. Every rank
        takes the same decision (a refusal on one rank is a refusal on all), so that they all
        go on to the same next candidate."""
        outcome: tuple[str, str] = ("ok", "")
        error: BaseException | None = None
        try:
            self._load(step, manifest, state, plan)
        except (Exception, CheckpointException) as e:  # CheckpointException: a BaseException
            error = e
            outcome = ("refused" if is_refusal(e) else "error", describe_error(e))
        gathered: list[tuple[str, str]] = [("ok", "")] * self._world_size
        dist.all_gather_object(gathered, outcome, group=self._group)
        failed = [(rank, text) for rank, (kind, text) in enumerate(gathered) if kind == "error"]
        if failed:
            if error is not None and outcome[0] == "error":
                raise error
            raise CheckpointError(f"restoring step {step} failed on rank {failed[0][0]}: "
                                  f"{failed[0][1]}")
        return next((text for kind, text in gathered if kind == "refused"), "")

    def _load(self, step: int, manifest: Manifest, state: dict[str, Any],
              plan: RestorePlan) -> None:
        parts = manifest.parts or plan.parts
        # A rank that did not exist when the checkpoint was taken has no RNG state in it: it
        # keeps the one it was seeded with (the world size changed: elastic). A partial
        # restore leaves the RNG alone.
        load_rng = self._rank < manifest.world_size and not parts
        storage_reader = reader(self._layout, step, manifest.data_dir)
        have = set(storage_reader.read_metadata().state_dict_metadata)
        legacy_rng = f"{RNG_PREFIX}{self._rank}.python_numpy" in have
        to_load = with_rng(self._rank, state, legacy_rng) if load_rng else dict(state)
        wanted, _ = flatten_state_dict(plain_state(to_load))
        selected = {k for k in wanted if _under(k, parts)}
        missing = sorted(selected - have)
        unexpected = sorted(k for k in have - set(wanted)
                            if _under(k, parts) and not k.startswith(RNG_PREFIX))
        if missing or unexpected:
            strict = plan.strict and not manifest.parts
            detail = (f"missing from the checkpoint: {few(missing)}; "
                      f"in the checkpoint but not in the state: {few(unexpected)}")
            if strict:
                raise CheckpointError(
                    f"step {step} does not match the state being restored ({detail}); set "
                    "checkpoint.strict: false to restore what matches, or "
                    "checkpoint.restore_parts to restore some parts only")
            if self._rank == 0:
                self._emit("checkpoint_keys_mismatch", step=step, missing=missing[:100],
                           unexpected=unexpected[:100], missing_count=len(missing),
                           unexpected_count=len(unexpected))
        keep = lambda key: _under(key, parts) or key.startswith(RNG_PREFIX)  # noqa: E731
        dcp.load(to_load, storage_reader=storage_reader, planner=_PartialLoadPlanner(keep),
                 process_group=self._group)

    def _verify(self, step: int) -> tuple[Manifest | None, list[str], list[str]]:
        """Every rank checks its share of the files; all ranks see all problems: the files
        that mismatch the manifest, and those that could not be read."""
        manifest = None
        mismatched: list[str] = []
        unreadable: list[str] = []
        try:
            manifest = commit.read_manifest(self._layout, step)
            mine = commit.share_of(sorted(manifest.files), self._rank, self._world_size)
            found = commit.verify_files(self._layout, manifest, mine)
            mismatched, unreadable = found.mismatched, found.unreadable
        except ManifestError as e:
            mismatched = [f"rank {self._rank}: {e}"]
        except OSError as e:
            unreadable = [f"rank {self._rank}: manifest cannot be read now: "
                          f"{type(e).__name__} ({getattr(e, 'strerror', None) or e})"]
        gathered: list[tuple[list[str], list[str]]] = [([], [])] * self._world_size
        dist.all_gather_object(gathered, (mismatched, unreadable), group=self._group)
        return (manifest, sorted({p for share, _ in gathered for p in share}),
                sorted({p for _, share in gathered for p in share}))
