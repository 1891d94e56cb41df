"""Worker-side checkpointing: DCP saves and loads under the commit protocol of commit.py.

Every public method is collective: all ranks call it in the same order with the same
arguments. Three process groups are involved, each for a reason:
  - the training group (NCCL or gloo) is never used here;
  - `group` (gloo) carries what the training thread does: restores, the decision to save,
    the per-step agreement of `agree_max`;
  - `save_group` (gloo) carries what the background save thread does. A save running in the
    background on the same group as the training thread would interleave its collectives
    with the training thread's and deadlock.

Saves (`checkpoint.async_mode`):
  off      the training thread writes, checksums, commits;
  thread   a snapshot is taken (snapshot.py: the big copy overlaps the next step) and a
           background thread writes and commits it;
  process  as thread, but a child process per worker writes (save_process.py), so the
           serialisation does not compete with training for the GIL.
At most one save is in flight: the next waits for it (an event says how long). The manifest
is written only after every rank reports its write finished.

A save that fails for its storage (save_failures.py) commits nothing, in either mode: every
rank learns the same outcome, a `checkpoint_failed` event says why, its partial files are
removed, and `checkpoint.on_save_error` decides whether training goes on. Ranks raise the
resulting StorageFailure at the same step (agreed in `agree_max`, each step).
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
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

import orchestrator
from orchestrator.chaos import FaultInjector
from orchestrator.checkpoint import commit, housekeeping
from orchestrator.checkpoint.layout import SAVE_DIR_PREFIX, RunLayout
from orchestrator.checkpoint.manifest import FileEntry, Manifest, ManifestError
from orchestrator.checkpoint.safe_load import SafeLoadPlanner, is_refusal, legacy_rng_state
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.checkpoint.save_failures import AfterFailedSave, after_failed_save, explain, is_storage_error
from orchestrator.checkpoint.save_process import SaveProcess, SaveRequest
from orchestrator.checkpoint.snapshot import Snapshot, Snapshotter, StepGate, optimizers_in, plain_state
from orchestrator.checkpoint.writer import hashing_writer, reader
from orchestrator.config import CheckpointConfig
from orchestrator.lease import current_generation
from orchestrator.errors import CheckpointError, SavesKeepFailing, StorageError, StorageFailure

Emit = Callable[..., None]
log = logging.getLogger(__name__)
_RNG_PREFIX = "rng_rank"
_KEYS_SHOWN = 8


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
                "python": torch.tensor([version, *internal], dtype=torch.int64),
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


@dataclass
class _Job:
    step: int
    data_dir: str
    future: concurrent.futures.Future


class CheckpointManager:
    def __init__(self, *, layout: RunLayout, rank: int, world_size: int, parallelism: str,
                 group: dist.ProcessGroup, save_group: dist.ProcessGroup | None,
                 config: CheckpointConfig, faults: FaultInjector, emit: Emit,
                 host: str = "127.0.0.1", timeout_s: float = 300.0, job_id: str = "",
                 fencing_token: int = 0) -> None:
        self._layout = layout
        self._job_id = job_id
        self._fencing_token = fencing_token
        self._rank = rank
        self._world_size = world_size
        self._parallelism = parallelism
        self._group = group
        self._save_group = save_group or group
        self._config = config
        self._faults = faults
        self._emit = emit
        self._mode = config.async_mode
        if self._mode != "off" and save_group is None:
            raise ValueError("async saves need a save_group of their own")
        self._snapshotter = Snapshotter(shared_memory=self._mode == "process",
                                        keep_dtensors=self._mode == "thread")
        self._gate = StepGate(self._on_gate_wait)
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        self._job: _Job | None = None
        self._writer_process = None
        if self._mode == "process":
            self._writer_process = SaveProcess(rank=rank, world_size=world_size, host=host,
                                               timeout_s=timeout_s)
            # Started now, on a thread of its own (a new Python importing torch takes
            # seconds), so that it is ready by the first save, and so that the first save's
            # snapshot copy, on the background thread, does not queue behind it. The save
            # group's first collective (the store port, in start) is over before the first
            # save uses the group: _write waits for it.
            starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-start")
            self._writer_ready = starter.submit(
                self._writer_process.start,
                lambda port: self._broadcast_int(port, self._save_group))
            starter.shutdown(wait=False)
        self._replaced_later: dict[int, list[int]] = {}
        # Failed saves: counted on every rank alike (each save's outcome is agreed); set by
        # whichever thread ran the save, read by the training thread.
        self._lock = threading.Lock()
        self._failed_in_row = 0
        self._last_failure = ""
        self._pending = AfterFailedSave.CONTINUE
        self.stall_s = 0.0
        """Time the training thread spent blocked on checkpoint saves, in total."""

    # --- restore ---------------------------------------------------------------------------

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
        with_rng = self._rank < manifest.world_size and not parts
        storage_reader = reader(self._layout, step, manifest.data_dir)
        have = set(storage_reader.read_metadata().state_dict_metadata)
        legacy_rng = f"{_RNG_PREFIX}{self._rank}.python_numpy" in have
        to_load = self._with_rng(state, legacy_rng) if with_rng else dict(state)
        wanted, _ = flatten_state_dict(plain_state(to_load))
        selected = {k for k in wanted if _under(k, parts)}
        missing = sorted(selected - have)
        unexpected = sorted(k for k in have - set(wanted)
                            if _under(k, parts) and not k.startswith(_RNG_PREFIX))
        if missing or unexpected:
            strict = plan.strict and not manifest.parts
            detail = (f"missing from the checkpoint: {_few(missing)}; "
                      f"in the checkpoint but not in the state: {_few(unexpected)}")
            if strict:
                raise CheckpointError(
                    f"step {step} does not match the state being restored ({detail}); set "
                    "checkpoint.strict: false to restore what matches, or "
                    "checkpoint.restore_parts to restore some parts only")
            if self._rank == 0:
                self._emit("checkpoint_keys_mismatch", step=step, missing=missing[:100],
                           unexpected=unexpected[:100], missing_count=len(missing),
                           unexpected_count=len(unexpected))
        keep = lambda key: _under(key, parts) or key.startswith(_RNG_PREFIX)  # noqa: E731
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

    # --- save ------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Save `state` as the checkpoint of `step`: at once (off), or start it (async)."""
        t0 = time.monotonic()
        self._wait_in_flight(step)
        # Every rank has now seen the previous save's outcome: act on it before this one.
        self.raise_failure(self._pending)
        data_dir, unusable = self._prepare(step)
        metrics = {k: float(v) for k, v in metrics.items()}
        if unusable or self._mode == "off":
            error = unusable or self._write_and_commit(step, data_dir, self._with_rng(state),
                                                       metrics, self._group, started=t0)
            self._after_save(step, data_dir, error)
            if not error:
                self._background.submit(self._housekeeping, step)
            self.stall_s += time.monotonic() - t0
            self.raise_failure(self._pending)  # every rank knows the outcome: raise now
            return
        snap = self._snapshotter.take(self._with_rng(state))
        self._gate.hook(optimizers_in(state))
        self._gate.arm(snap)
        future = self._background.submit(self._save_in_background, step, data_dir, snap,
                                         metrics, t0)
        self._job = _Job(step, data_dir, future)
        self.stall_s += time.monotonic() - t0

    def wait(self) -> None:
        """Block until the save in flight, if any, is committed (or has failed)."""
        self._wait_in_flight(None)

    def settle(self) -> None:
        """Block until the save in flight and the housekeeping after it are done."""
        self.wait()
        self._background.submit(lambda: None).result()

    def finish(self) -> None:
        """The attempt ended well: wait for the save in flight and the housekeeping. If the
        last save failed, the run has not got its final checkpoint: a StorageFailure, so the
        driver resumes from the latest commit instead of reporting success."""
        self.settle()
        self.close()
        self.raise_failure(self._pending)
        with self._lock:
            last = self._last_failure if self._failed_in_row else ""
        if last:
            raise StorageFailure(f"{last}; it was the last save, so the run resumes from the "
                                 "latest committed checkpoint")

    @property
    def pending_failure(self) -> int:
        """What this rank's failed saves call for (an AfterFailedSave), for the ranks to
        agree on in `agree_max` before any of them acts."""
        with self._lock:
            return int(self._pending)

    def raise_failure(self, agreed: int) -> None:
        """Raise what the ranks agreed a failed save calls for; nothing for CONTINUE."""
        action = AfterFailedSave(agreed)
        if action is AfterFailedSave.CONTINUE:
            return
        with self._lock:
            why = self._last_failure or "a save failed (as another rank saw it)"
        raise (SavesKeepFailing if action is AfterFailedSave.STOP else StorageFailure)(why)

    def close(self, timeout_s: float | None = None) -> None:
        """Let go of the background thread and writer process; wait at most `timeout_s` for a
        save in flight (after a failure its peers may be gone, and it fails with them)."""
        self._gate.remove()
        if self._job is not None:
            concurrent.futures.wait([self._job.future], timeout=timeout_s)
        self._background.shutdown(wait=timeout_s is None)
        if self._writer_process is not None:
            concurrent.futures.wait([self._writer_ready], timeout=timeout_s)
            self._writer_process.close()

    def _wait_in_flight(self, next_step: int | None) -> None:
        job, self._job = self._job, None
        if job is None:
            return
        t0 = time.monotonic()
        was_done = job.future.done()
        job.future.result()  # _save_in_background reports its own errors
        waited = time.monotonic() - t0
        if next_step is not None and not was_done and self._rank == 0:
            log.info("checkpoint of step %d waits %.2fs for the save of step %d",
                     next_step, waited, job.step)
            self._emit("checkpoint_wait", step=next_step, waiting_for=job.step,
                       waited_s=round(waited, 3))

    def _on_gate_wait(self, waited_s: float) -> None:
        self.stall_s += waited_s

    def _prepare(self, step: int) -> tuple[str, str]:
        """Rank 0 decides whether `step` may be saved and names the new save folder:
        (folder, why the storage cannot take the save now, or "")."""
        error, unusable, data_dir = None, "", f"{SAVE_DIR_PREFIX}{uuid.uuid4().hex[:12]}"
        if self._rank == 0:
            try:
                error = housekeeping.refuse_save(self._layout, step, self._config.overwrite)
                # Listed now, before this save starts, so that the deletion after its commit
                # can only ever hit checkpoints of an abandoned timeline, never a later save.
                self._replaced_later[step] = (housekeeping.later_steps(self._layout, step)
                                              if self._config.overwrite and not error else [])
            except OSError as e:
                unusable = f"rank 0: listing the checkpoints: {describe_error(e)}"
        box = [error, unusable, data_dir]
        dist.broadcast_object_list(box, src=0, group=self._group)
        if box[0]:
            raise CheckpointError(box[0])
        return box[2], box[1]

    def _save_in_background(self, step: int, data_dir: str, snap: Snapshot,
                            metrics: dict[str, float], started: float) -> None:
        try:
            snap.copy_deferred()
            error = self._write_and_commit(step, data_dir, snap.state, metrics,
                                           self._save_group, started=started,
                                           copy_s=snap.copy_s)
            self._after_save(step, data_dir, error)
            if not error:
                self._housekeeping(step)
        except BaseException as e:  # noqa: BLE001 -- a background save must never vanish
            log.exception("background save of step %d failed", step)
            self._emit("checkpoint_failed", step=step, errors=[describe_error(e)])

    def _write_and_commit(self, step: int, data_dir: str, state: dict[str, Any],
                          metrics: dict[str, float], group: dist.ProcessGroup, *,
                          started: float, copy_s: float = 0.0) -> str:
        """Write, gather every rank's checksums, and (rank 0) commit. Every rank returns the
        same answer: "" when the checkpoint committed, else why it did not (a storage
        failure). Anything else (a bug, the fence) raises."""
        error, written = "", {}
        try:
            written = self._write(step, data_dir, state, group)
        except BaseException as e:  # noqa: BLE001 -- gathered below, so every rank knows
            if self._mode == "off" and not is_storage_error(e):
                raise  # a bug in the workload's state, as ever a user_error
            # DCP's CheckpointException already names every rank's error.
            error = (describe_error(e) if isinstance(e, CheckpointException)
                     else f"rank {self._rank}: {describe_error(e)}")
        written_s = time.monotonic() - started
        self._faults.on_shards_written(step)
        shares: list[Any] = [None] * self._world_size
        dist.all_gather_object(shares, (written, error), group=group)
        outcome = ["; ".join(dict.fromkeys(e for _, e in shares if e))]  # each error once
        if not outcome[0] and self._rank == 0:
            try:
                self._commit(step, data_dir, shares, metrics, started, written_s, copy_s)
            except _Fenced as e:
                outcome = [f"{_FENCED}{e}"]
            except Exception as e:  # noqa: BLE001 -- told to every rank just below
                outcome = [f"rank 0: committing: {describe_error(e)}"]
        # The commit's outcome, from rank 0: every rank counts failed saves alike.
        dist.broadcast_object_list(outcome, src=0, group=group)
        if outcome[0].startswith(_FENCED):
            raise CheckpointError(outcome[0][len(_FENCED):])
        return outcome[0]

    def _commit(self, step: int, data_dir: str, shares: list[Any], metrics: dict[str, float],
                started: float, written_s: float, copy_s: float) -> None:
        """Rank 0: check the files, check the fence, write the manifest."""
        files: dict[str, FileEntry] = {}
        for share, _ in shares:
            files.update(share)
        files = self._complete(step, data_dir, files)
        manifest = Manifest(
            step=step, world_size=self._world_size, parallelism=self._parallelism,
            data_dir=data_dir, files=files, metrics=metrics,
            torch_version=torch.__version__, orchestrator_version=orchestrator.__version__,
            job_id=self._job_id, fencing_token=self._fencing_token,
        )
        if self._fencing_token:
            # The fence: a driver that lost the run's lease has workers that must never
            # commit once the takeover is written (checked as close to the write as we can).
            newest = current_generation(self._layout)
            if newest != self._fencing_token:
                self._emit("checkpoint_fenced", step=step, fencing_token=self._fencing_token,
                           lease_generation=newest)
                raise _Fenced(
                    f"step {step} not committed: this job's lease (generation "
                    f"{self._fencing_token}) was taken over by generation {newest}")
        commit.write_manifest(self._layout, manifest)
        self._emit("checkpoint_committed", step=step, bytes=manifest.total_bytes,
                   mode=self._mode, copy_s=round(copy_s, 3), write_s=round(written_s, 3),
                   total_s=round(time.monotonic() - started, 3))

    def _after_save(self, step: int, data_dir: str, error: str) -> None:
        """Count a save's outcome (the same on every rank); for a failed one, say so, remove
        its files and decide what it calls for (save_failures.py)."""
        with self._lock:
            if not error:
                self._failed_in_row, self._last_failure = 0, ""
                return
            self._failed_in_row += 1
            failed_in_row = self._failed_in_row
        action = after_failed_save(failed_in_row, self._config)
        why = explain(action, step, failed_in_row, error, self._config)
        if self._rank == 0:
            log.error("%s", why)
            cleanup = housekeeping.remove_failed_save(self._layout, step, data_dir)
            self._emit("checkpoint_failed", step=step, errors=[error],
                       failure_kind="storage_error", failed_in_row=failed_in_row,
                       then=action.name.lower(), partial_files=cleanup)
        with self._lock:
            self._last_failure = why
            self._pending = max(self._pending, action)

    def _write(self, step: int, data_dir: str, state: dict[str, Any],
               group: dist.ProcessGroup) -> dict[str, FileEntry]:
        if self._writer_process is None:
            writer = hashing_writer(self._layout, step, data_dir)
            dcp.save(state, storage_writer=writer, process_group=group)
            return dict(writer.fs.written)
        self._writer_ready.result()  # raises if the writer process failed to start
        if not self._writer_process.alive:
            raise CheckpointError("the checkpoint writer process is gone")
        reply = self._writer_process.save(SaveRequest(
            state=state, storage_url=self._layout.storage.url, run_name=self._layout.run_name,
            step=step, data_dir=data_dir))
        if reply.error:
            raise CheckpointError(f"writer process: {reply.error}")
        return reply.written

    def _complete(self, step: int, data_dir: str,
                  files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        """Every file in the save folder must have a checksum; hash any a writer did not
        report (none, normally) by reading it back."""
        names = commit.data_files(self._layout, step, data_dir)
        unseen = sorted(set(files) - set(names))
        if unseen:
            # Another rank wrote a file this rank cannot see: their storage is not shared
            # (a local path on a multi-node cluster). A manifest without it would verify and
            # restore without that rank's shards.
            raise StorageError(
                f"step {step} not committed: rank 0 cannot see {_few(unseen)}, which other "
                f"ranks wrote to {self._layout.storage.url}; every rank must reach the same "
                "storage (use S3 or a shared filesystem for run.storage)")
        unknown = [n for n in names if n not in files]
        if unknown:
            files = {**files, **commit.checksum_files(self._layout, step, data_dir, unknown)}
        return {n: files[n] for n in names}

    def _housekeeping(self, step: int) -> None:
        """After a commit, on rank 0, off the training thread: drop what the commit replaced
        and what retention no longer keeps."""
        if self._rank != 0:
            return
        later = self._replaced_later.pop(step, [])
        try:
            for event in housekeeping.after_commit(self._layout, step, self._config, later):
                self._emit(**event)
        except Exception as e:  # noqa: BLE001 -- deleting old checkpoints must not stop training
            log.exception("housekeeping after step %d failed", step)
            self._emit("checkpoint_housekeeping_failed", step=step, error=str(e)[:500])

    def agree_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of `values` over all ranks (one small collective)."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return [int(v) for v in t.tolist()]

    # --- plumbing --------------------------------------------------------------------------

    def _broadcast_int(self, value: int, group: dist.ProcessGroup) -> int:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=group)
        return int(box[0])

    def _with_rng(self, state: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
        return {**state, f"{_RNG_PREFIX}{self._rank}": RankRng(legacy)}


class _Fenced(CheckpointError):
    """This job's lease was taken over: its workers must not commit (lease.py)."""


_FENCED = "fenced: "


def describe_error(e: BaseException) -> str:
    """One line per failed rank: DCP wraps every rank's error in a CheckpointException whose
    str() is a page of traceback."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}"
                         for rank, (exc, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {str(e)[:500]}"


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more
