"""Where a job's wall time went: goodput, and the time lost by cause.

One fold over the run's events, used alike by the driver (live, for metrics and the
progress line, and for summary.json at the end) and by `orchestrator report` (from the
stored log, after the fact, or of a run whose driver died). Pure: no Ray, no storage.

The wall time of a job (its first `job_start` to its `job_end`, across drivers that continued
it) is split into:

- productive: the steps the final model descends from, less the time they waited for a
  checkpoint's copy;
- startup: from the job's start to its first step (workers starting, imports, restore);
- recovery: from the last step before a failure to the first step after it (detection,
  replacing workers, restore), a driver that died and the one that continued it included;
- recomputed: steps computed, then thrown away by a restore from an earlier checkpoint;
- checkpoint_stall: training blocked by saves (the save call, and waits for a snapshot's
  copy inside a step);
- finish: after the last step (the final save's commit, workers stopping);
- other: what none of those explain (the driver's own time between polls).

Step times come from rank 0's `progress` events, whose `span` covers every step since the
previous one ({first, last, busy_s, start, end}); a span that a restore cuts is split in
proportion to its steps. Events are read from storage, which is untrusted: a malformed one is
skipped, never raised on.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any, Iterable

CAUSES = ("startup", "recovery", "recomputed", "checkpoint_stall", "finish", "other")


@dataclass
class _Span:
    first: int
    last: int
    busy_s: float

    def cut_after(self, step: int) -> tuple["_Span | None", float]:
        """(the part up to `step`, the seconds of the part after it)."""
        if self.first > step:
            return None, self.busy_s
        if self.last <= step:
            return self, 0.0
        kept = (step - self.first + 1) / (self.last - self.first + 1)
        return _Span(self.first, step, self.busy_s * kept), self.busy_s * (1 - kept)


@dataclass(frozen=True)
class Breakdown:
    wall_s: float
    productive_s: float
    lost_s: dict[str, float]
    """Seconds by cause (CAUSES); with productive_s they add up to wall_s."""
    steps_completed: int
    lost_steps: int

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_summary(self) -> dict[str, Any]:
        return {
            "steps_completed": self.steps_completed,
            "lost_steps": self.lost_steps,
            "wall_s": round(self.wall_s, 3),
            "goodput": round(self.goodput, 4),
            "time_s": {"productive": round(self.productive_s, 3),
                       **{k: round(v, 3) for k, v in self.lost_s.items()}},
        }


@dataclass
class GoodputLedger:
    """Feed it every event of a job, in order (`add`); ask it at any time (`breakdown`)."""

    job_id: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    last_time: float | None = None
    _kept: list[_Span] = field(default_factory=list)
    _recomputed_s: float = 0.0
    _stall_s: float = 0.0
    _gate_wait_s: float = 0.0
    _startup_s: float = 0.0
    _recovery_s: float = 0.0
    _last_step_end: float | None = None
    _saw_step: bool = False
    _saw_job_start: bool = False
    _unplaced_stall: list[tuple[int, float]] = field(default_factory=list)
    """(step, seconds) of saves blocked after the latest recorded step: they sit in the gap
    that follows it (a restart, the job's end), and are not counted twice."""
    _restored_since_step: bool = False
    _restart_from: int | None = None
    """The storage step of a restart not yet followed by the workers' own restore event (the
    memory tier may resume from a newer step; a fresh start emits none)."""
    highest_step: int = 0
    lost_steps: int = 0

    def add(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        try:
            self._add(event)
        except (TypeError, ValueError, KeyError, AttributeError):
            return  # a malformed event from storage explains nothing: skipped

    def _add(self, event: dict) -> None:
        kind, time_ = event.get("kind"), _number(event.get("time"))
        if kind == "job_start":
            job_id = str(event.get("job_id") or "")
            if self.started_at is None or (self._saw_job_start and job_id != self.job_id):
                # A new job on this run (or the first): the ledger is about the latest one.
                fresh = GoodputLedger(job_id=job_id, started_at=time_)
                self.__dict__.update(fresh.__dict__)
            self.job_id, self._saw_job_start = job_id, True
            self.ended_at = None  # a continued job goes on
        if self.started_at is None:
            self.started_at = time_  # a log without its job_start counts from its first event
        if self.started_at is None:
            return
        if time_ is not None:
            self.last_time = max(self.last_time or time_, time_)
        if kind == "progress" and isinstance(event.get("span"), dict):
            if self._restart_from is not None:
                self._restore(self._restart_from)
            self._add_span(event["span"])
        elif kind == "restart":
            self._restart_from = int(event["from_step"])
        elif kind in ("checkpoint_restored", "memory_restored") and event.get("rank", 0) == 0:
            self._restore(int(event["step"]))
        elif kind == "failure":
            self.highest_step = max(self.highest_step, int(event.get("step") or 0))
        elif kind == "checkpoint_stall" and event.get("rank", 0) == 0:
            blocked_s = max(_number(event.get("blocked_s")) or 0.0, 0.0)
            self._stall_s += blocked_s
            self._unplaced_stall.append((int(event.get("step") or 0), blocked_s))
            self._gate_wait_s += max(_number(event.get("gate_wait_s")) or 0.0, 0.0)
        elif kind == "job_end":
            self.ended_at = time_

    def _add_span(self, span: dict) -> None:
        first, last = int(span["first"]), int(span["last"])
        busy_s, start, end = (float(span["busy_s"]), float(span["start"]),
                              float(span["end"]))
        if last < first or busy_s < 0 or end < start:
            return
        # Saves after the previous span's last step (and before this one's first) happened
        # in the gap before this span; those after this span's last step, in the next gap.
        before = sum(s for step, s in self._unplaced_stall if step < first)
        self._unplaced_stall = [(step, s) for step, s in self._unplaced_stall if step >= last]
        gap = max(start - (self._last_step_end if self._saw_step else self.started_at)
                  - before, 0.0)
        if not self._saw_step:
            self._startup_s += gap
        elif self._restored_since_step:
            self._recovery_s += gap
        self._restored_since_step = False
        self._saw_step = True
        self._last_step_end = end
        self._kept.append(_Span(first, last, busy_s))
        self.highest_step = max(self.highest_step, last)

    def _restore(self, step: int) -> None:
        """The gang resumed from `step`: every step computed after it is lost."""
        kept = []
        for span in self._kept:
            part, lost_s = span.cut_after(step)
            self._recomputed_s += lost_s
            if part is not None:
                kept.append(part)
        self._kept = kept
        self.lost_steps += max(self.highest_step - step, 0)
        self.highest_step = step
        self._restored_since_step = True
        self._restart_from = None

    def breakdown(self, now: float | None = None) -> Breakdown:
        if self._restart_from is not None:  # as it stands: from the storage step, for now
            pending = copy.deepcopy(self)
            pending._restore(self._restart_from)
            return pending.breakdown(now)
        if self.started_at is None:
            return Breakdown(0.0, 0.0, dict.fromkeys(CAUSES, 0.0), 0, 0)
        end = self.ended_at if self.ended_at is not None else (now or self.last_time
                                                              or self.started_at)
        wall_s = max(end - self.started_at, 0.0)
        busy_s = sum(s.busy_s for s in self._kept)
        productive_s = max(busy_s - self._gate_wait_s, 0.0)
        finish_s = max(end - self._last_step_end
                       - sum(s for _, s in self._unplaced_stall), 0.0) if self._saw_step else 0.0
        lost = {"startup": self._startup_s if self._saw_step else wall_s,
                "recovery": self._recovery_s, "recomputed": self._recomputed_s,
                "checkpoint_stall": self._stall_s + min(self._gate_wait_s, busy_s),
                "finish": finish_s}
        lost["other"] = max(wall_s - productive_s - sum(lost.values()), 0.0)
        return Breakdown(wall_s=wall_s, productive_s=productive_s, lost_s=lost,
                         steps_completed=self.highest_step, lost_steps=self.lost_steps)


def breakdown(events: Iterable[Any], now: float | None = None) -> Breakdown:
    """The breakdown of the latest job in `events` (a run's whole log)."""
    ledger = GoodputLedger()
    for event in events:
        ledger.add(event)
    return ledger.breakdown(now)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None
