"""The API a workload sees: `train(ctx: TrainContext)`.

A workload builds its model, calls `ctx.restore(state)` once, trains from the step it returns,
calls `ctx.report(step, ...)` after every step and `ctx.save_checkpoint(...)` when
`ctx.checkpoint_due(step)` (and at its last step). With async saves, `save_checkpoint` returns
as soon as the state is snapshotted, and the model's next `optimizer.step()` waits, if it must,
for the snapshot's copy to finish (checkpoint/snapshot.py). Everything else -- process groups, storage,
the commit protocol, fault injection -- is the orchestrator's business.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from orchestrator.chaos.inject import FaultInjector
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.memory import MemoryTier
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.checkpoint.state_dict_cache import StateDictCache
from orchestrator.config import CheckpointConfig
from orchestrator.hangs import Activity


@dataclass(frozen=True)
class Progress:
    """What a worker last told the world: read by the driver from another thread."""

    step: int = 0
    time: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    """Bumped on every sign of life of the training thread (a step, a save, a restore): the
    driver's hang detection watches it."""
    doing: Activity = Activity.START
    """What the training thread does until its next sign of life: the driver allows each
    activity its own time (orchestrator/hangs.py)."""


class Reporter:
    """Buffers progress, step times and events until the driver polls them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.progress = Progress()
        self._step_times: list[tuple[int, float, float]] = []
        self._events: list[dict[str, Any]] = []
        self._progressed_at = time.monotonic()
        self._slowest: dict[str, float] = {}
        """Per activity, the longest time between two signs of progress that ended it, since
        the last poll: the driver learns the run's pace from it (orchestrator/hangs.py)."""

    def _progressed(self) -> None:
        now = time.monotonic()
        doing = self.progress.doing.value
        self._slowest[doing] = max(self._slowest.get(doing, 0.0), now - self._progressed_at)
        self._progressed_at = now

    def step_done(self, step: int, duration_s: float, metrics: dict[str, float]) -> None:
        with self._lock:
            self._progressed()
            self.progress = Progress(step=step, metrics=metrics, seq=self.progress.seq + 1,
                                     doing=Activity.STEP)
            self._step_times.append((step, duration_s, self.progress.time))

    def alive(self, step: int | None = None, doing: Activity | None = None) -> None:
        """The training thread made progress that is not a step (a save, or a restore, which
        sets the step the attempt continues from), and does `doing` next."""
        with self._lock:
            self._progressed()
            p = self.progress
            self.progress = Progress(step=p.step if step is None else step, metrics=p.metrics,
                                     seq=p.seq + 1, doing=doing or p.doing)

    def now_doing(self, doing: Activity) -> None:
        """The training thread starts `doing` (no progress yet)."""
        with self._lock:
            self.progress = dataclasses.replace(self.progress, doing=doing)

    def emit(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._events.append({"kind": kind, "worker_time": round(time.time(), 3), **fields})

    def drain(self) -> tuple[Progress, list[tuple[int, float, float]], list[dict[str, Any]],
                             dict[str, float]]:
        with self._lock:
            out = (self.progress, self._step_times, self._events, self._slowest)
            self._step_times, self._events, self._slowest = [], [], {}
            return out


class StopMode(enum.IntEnum):
    """How urgently an attempt should end; ranks agree on the highest any of them holds."""

    NONE = 0
    AT_CHECKPOINT = 1
    """Stop after the next scheduled checkpoint (to change the world size)."""
    NOW = 2
    """Checkpoint after the step in progress, then stop (a preemption notice)."""


class StopRequest:
    """A request to end the attempt gracefully, set from outside the training thread (the
    SIGTERM handler, or the driver through the actor)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.mode = StopMode.NONE
        self.reason = ""

    def request(self, mode: StopMode, reason: str) -> None:
        with self._lock:
            if mode > self.mode:
                self.mode, self.reason = mode, reason


class AttemptStopped(BaseException):
    """Unwinds the workload after the checkpoint that a stop request asked for.

    A BaseException, so that a workload's `except Exception` does not swallow it.
    """


class TrainState(Stateful):
    """Model, optimizer, LR scheduler, step and data position as one DCP-saveable object.

    Uses torch's distributed state-dict API, so the same code serves DDP and FSDP2 and the
    saved tensors reshard on load at another world size or parallelism.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step = 0
        self.data_position = 0
        """How far the data stream has been consumed (the workload decides the unit)."""
        self._state_dicts = StateDictCache(model, optimizer)
        """torch's get_state_dict, 3 ms a call, kept while its tensors stay the same."""

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = self._state_dicts.get()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "step": self.step,
            "data_position": self.data_position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state_dicts.invalidate()
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.data_position = state["data_position"]


class TrainContext:
    def __init__(self, *, rank: int, world_size: int, local_rank: int, device: torch.device,
                 args: dict[str, Any], attempt: int, checkpoint: CheckpointConfig,
                 restore: RestorePlan, checkpoints: CheckpointManager,
                 faults: FaultInjector, reporter: Reporter, stop: StopRequest,
                 memory: MemoryTier | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.args = dict(args)
        self.attempt = attempt
        """0 for the first run of the gang, then 1, 2, ... after each restart."""
        self._interval_steps = checkpoint.interval_steps
        self._interval_s = checkpoint.interval_s
        self._restore_plan = restore
        self._last_save = time.monotonic()
        self._agreed_time_due = False
        self._checkpoints = checkpoints
        self._memory = memory
        self._faults = faults
        self._reporter = reporter
        self._stop = stop
        self._agreed_stop = StopMode.NONE
        self._last_report = time.monotonic()
        self._stall_reported_s = 0.0

    def restore(self, state: dict[str, Any]) -> int:
        """Load the newest state the run has into `state`; return its step (0: fresh start):
        the memory tier's copy when the gang holds one for every rank at least as new as the
        latest storage checkpoint (checkpoint/memory.py), else the latest committed checkpoint.

        Collective: call once on every rank, before training. From then on `report` keeps
        `state`'s copies in the memory tier.
        """
        plan, step = self._restore_plan, None
        if self._memory is not None:
            # A checkpoint the user named (or parts of one) is what they asked for: only a
            # restart resumes from memory.
            if plan.required or plan.parts:
                self._memory.clear()
            step = self._memory.restore(
                state, newest_in_storage=plan.candidates[0] if plan.candidates else 0)
        if step is None:
            step = self._checkpoints.restore(state, plan)
            if self._memory is not None:
                self._memory.clear()  # a copy of another timeline must never be restored
        self._reporter.alive(step)
        self._last_report = time.monotonic()
        return step

    def checkpoint_due(self, step: int) -> bool:
        """Whether to save after `step`: on the step interval, when `interval_s` has passed
        since the last save, or at once when the gang agreed to stop now (a preemption
        notice). Every rank gets the same answer (it was agreed in `report`)."""
        on_interval = self._interval_steps > 0 and step % self._interval_steps == 0
        return on_interval or self._agreed_time_due or self._agreed_stop is StopMode.NOW

    def save_checkpoint(self, step: int, state: dict[str, Any],
                        metrics: dict[str, float] | None = None) -> None:
        """Save and commit the checkpoint of `step`. Collective: every rank calls it."""
        t0 = time.monotonic()
        self._reporter.now_doing(Activity.SAVE)
        # Waits for a snapshot's copy inside the steps since the previous save (async modes).
        gate_wait_s = self._checkpoints.stall_s - self._stall_reported_s
        self._checkpoints.save(step, state, metrics or {})
        self._stall_reported_s = self._checkpoints.stall_s
        if self.rank == 0:  # what training lost to this save, for the goodput breakdown
            self._reporter.emit("checkpoint_stall", step=step,
                                blocked_s=round(time.monotonic() - t0, 4),
                                gate_wait_s=round(max(gate_wait_s, 0.0), 4))
        stopping = self._agreed_stop is not StopMode.NONE
        # Before a stop, waiting for the commit is part of the save.
        self._reporter.alive(doing=Activity.SAVE if stopping else Activity.STEP)
        self._last_save = time.monotonic()
        self._agreed_time_due = False
        if stopping:
            self._checkpoints.wait()  # the checkpoint we stop after must be committed
            self._reporter.alive()
            raise AttemptStopped(self._stop.reason or "a peer was asked to stop")
        # A save's time is not the next step's: restart the step clock.
        self._last_report = time.monotonic()

    def report(self, step: int, **metrics: float) -> None:
        """Publish that `step` is done, with its metrics. Call on every rank after each step."""
        now = time.monotonic()
        self._reporter.step_done(step, now - self._last_report,
                                 {k: float(v) for k, v in metrics.items()})
        self._last_report = now
        self._faults.on_step_end(step)
        # A sync point, one small all-reduce a step: every rank must take the same decision
        # to checkpoint and stop, whichever rank got the notice or saw the clock run out.
        time_due = self._interval_s > 0 and now - self._last_save >= self._interval_s
        stop, due, failed_save = self._checkpoints.agree_max(
            [int(self._stop.mode), int(time_due), self._checkpoints.pending_failure])
        self._agreed_stop, self._agreed_time_due = StopMode(stop), bool(due)
        # A background save that failed and calls for it ends the attempt on every rank at
        # this same step (checkpoint.on_save_error).
        self._checkpoints.raise_failure(failed_save)
        if self._memory is not None:
            self._memory.capture(step)
