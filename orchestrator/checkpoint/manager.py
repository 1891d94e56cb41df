"""Worker-side checkpointing: DCP saves under the commit protocol of commit.py, and the
restore (restore.py, the one read path).

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
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import orchestrator
from orchestrator.chaos.inject import FaultInjector
from orchestrator.checkpoint import commit, housekeeping
from orchestrator.checkpoint.layout import SAVE_DIR_PREFIX, RunLayout
from orchestrator.checkpoint.manifest import FileEntry, Manifest
from orchestrator.checkpoint.describe import describe_error, few
from orchestrator.checkpoint.restore import Restorer, with_rng
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.checkpoint.save_failures import AfterFailedSave, after_failed_save, explain, is_storage_error
from orchestrator.checkpoint.save_process import SaveProcess, SaveRequest
from orchestrator.checkpoint.snapshot import Snapshot, Snapshotter, StepGate, optimizers_in
from orchestrator.checkpoint.writer import hashing_writer
from orchestrator.config import CheckpointConfig
from orchestrator.lease import current_generation
from orchestrator.errors import CheckpointError, SavesKeepFailing, StorageError, StorageFailure

Emit = Callable[..., None]
log = logging.getLogger(__name__)


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
        self._restorer = Restorer(layout=layout, rank=rank, world_size=world_size,
                                  group=group, emit=emit)
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
        """Load the first candidate whose files verify; return its step, or 0 if none
        (restore.py)."""
        return self._restorer.restore(state, plan)

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
            error = unusable or self._write_and_commit(step, data_dir, with_rng(self._rank, state),
                                                       metrics, self._group, started=t0)
            self._after_save(step, data_dir, error)
            if not error:
                self._background.submit(self._housekeeping, step)
            self.stall_s += time.monotonic() - t0
            self.raise_failure(self._pending)  # every rank knows the outcome: raise now
            return
        snap = self._snapshotter.take(with_rng(self._rank, state))
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
                f"step {step} not committed: rank 0 cannot see {few(unseen)}, which other "
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



class _Fenced(CheckpointError):
    """This job's lease was taken over: its workers must not commit (lease.py)."""


_FENCED = "fenced: "
