"""Hang detection as data: which ranks made no progress for too long.

Every worker answers the driver's poll from a thread of its own with a progress counter that
its training thread bumps on every step, save and restore, and with what that thread is doing
now (`Activity`). `ProgressWatch` turns those answers into a verdict. It is pure (times are
passed in), so unit tests drive it directly.

How long is too long (`HangTimeouts`), when `failure.hang_timeout_s` is `auto`: a rank is
hung when it has shown no progress for `hang_factor` times the longest the run has taken so far
between two signs of progress ending the same kind of work, and never sooner than
`hang_min_s`. The pace is learned from the run itself (`Pace`, kept across attempts; workers
time their own work and report it with each poll), so that a slow model needs no tuning and
a fast one is not left hanging for minutes. Work the run has not timed yet -- the start of an
attempt (start-up, restore, the first step with its compilation) or its first save -- gets the
longer `hang_first_step_s`, since nothing is known about it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Activity(str, enum.Enum):
    """What a rank's training thread does between two signs of progress."""

    START = "start"
    """From the attempt's launch to its first finished step (start-up, restore, compile)."""
    STEP = "step"
    SAVE = "save"
    """The blocking part of a checkpoint save (and, before a stop, waiting for its commit)."""

    @property
    def words(self) -> str:
        return {"start": "the start of an attempt", "step": "a step", "save": "a save"}[self.value]


@dataclass
class Pace:
    """The longest time between two signs of progress seen so far in this run, per activity.
    Only grows: one slow step is enough to allow for another."""

    slowest_s: dict[Activity, float] = field(default_factory=dict)

    def learn(self, activity: Activity, interval_s: float) -> None:
        self.slowest_s[activity] = max(self.slowest_s.get(activity, 0.0), interval_s)


@dataclass(frozen=True)
class HangTimeouts:
    """How long a rank may show no progress, by what it is doing."""

    fixed_s: float | None
    """A number: that, whatever the rank does (`failure.hang_timeout_s` given as seconds)."""
    factor: float
    min_s: float
    first_step_s: float

    @classmethod
    def of(cls, failure) -> HangTimeouts:
        """From a FailureConfig."""
        fixed = None if failure.hang_timeout_s == "auto" else float(failure.hang_timeout_s)
        return cls(fixed_s=fixed, factor=failure.hang_factor, min_s=failure.hang_min_s,
                   first_step_s=failure.hang_first_step_s)

    def limit_s(self, activity: Activity, pace: Pace) -> tuple[float, str]:
        """The timeout for a rank doing `activity`, and why, in words."""
        if self.fixed_s is not None:
            return self.fixed_s, f"failure.hang_timeout_s={self.fixed_s:g}"
        slowest = pace.slowest_s.get(activity)
        if activity is Activity.START or slowest is None:
            learned = self.factor * (slowest or 0.0)
            if learned > self.first_step_s:
                return learned, (f"auto: {self.factor:g} x the slowest start so far "
                                 f"({slowest:.1f}s)")
            what = activity.words if activity is Activity.START else (
                f"{activity.words} not timed before")
            return self.first_step_s, f"auto: failure.hang_first_step_s for {what}"
        learned = self.factor * slowest
        if learned < self.min_s:
            return self.min_s, (f"auto: failure.hang_min_s ({self.factor:g} x the slowest "
                                f"{activity.value} so far, {slowest:.2f}s, is less)")
        return learned, f"auto: {self.factor:g} x the slowest {activity.value} so far ({slowest:.2f}s)"


@dataclass
class _Rank:
    seq: int = -1
    progressed_at: float = 0.0
    answered_at: float = 0.0
    doing: Activity = Activity.START


@dataclass(frozen=True)
class Hang:
    """A rank found hung, with what it was doing and the timeout it ran past."""

    rank: int
    doing: Activity
    stalled_s: float
    timeout_s: float
    why: str


class ProgressWatch:
    def __init__(self, ranks: range, now: float, timeouts: HangTimeouts,
                 pace: Pace | None = None) -> None:
        self.timeouts = timeouts
        self.pace = pace if pace is not None else Pace()
        self._ranks = {r: _Rank(progressed_at=now, answered_at=now) for r in ranks}

    @property
    def ranks(self) -> set[int]:
        return set(self._ranks)

    def saw(self, rank: int, progress_seq: int, now: float,
            doing: Activity | str = Activity.STEP,
            slowest_s: dict[str, float] | None = None) -> None:
        """A poll of `rank` answered with this progress counter, what it does now, and how
        long the activities it ended since the last poll took at most. The worker times them
        itself: a save shorter than a poll's interval is timed as well as a long one."""
        watch = self._ranks.get(rank)
        if watch is None:
            return
        for activity, took_s in (slowest_s or {}).items():
            self.pace.learn(Activity(activity), float(took_s))
        watch.answered_at = now
        if progress_seq != watch.seq:
            watch.seq, watch.progressed_at = progress_seq, now
        watch.doing = Activity(doing)

    def hung(self, ended: set[int], now: float) -> list[Hang]:
        """Ranks without progress for their timeout. A rank that stopped answering polls is
        the culprit; peers blocked in a collective with it still answer, and are spared. When
        every stalled rank still answers (a deadlock, a stuck collective), all of them are
        hung."""
        stalled, silent = [], []
        for rank, w in self._ranks.items():
            if rank in ended:
                continue
            limit, why = self.timeouts.limit_s(w.doing, self.pace)
            if now - w.progressed_at > limit:
                hang = Hang(rank=rank, doing=w.doing, stalled_s=now - w.progressed_at,
                            timeout_s=limit, why=why)
                stalled.append(hang)
                if now - w.answered_at > limit:
                    silent.append(hang)
        return silent or stalled
