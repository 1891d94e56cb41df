"""Hang detection as data: which ranks made no progress for too long.

Every worker answers the driver's poll from a thread of its own with a progress counter that
its training thread bumps on every step, save and restore. `ProgressWatch` turns those
answers into a verdict; it is pure (times are passed in), so unit tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Rank:
    seq: int = -1
    progressed_at: float = 0.0
    answered_at: float = 0.0


class ProgressWatch:
    def __init__(self, ranks: range, now: float, hang_timeout_s: float) -> None:
        self.hang_timeout_s = hang_timeout_s
        self._ranks = {r: _Rank(progressed_at=now, answered_at=now) for r in ranks}

    @property
    def ranks(self) -> set[int]:
        return set(self._ranks)

    def saw(self, rank: int, progress_seq: int, now: float) -> None:
        """A poll of `rank` answered with this progress counter."""
        watch = self._ranks.get(rank)
        if watch is None:
            return
        watch.answered_at = now
        if progress_seq != watch.seq:
            watch.seq, watch.progressed_at = progress_seq, now

    def hung(self, ended: set[int], now: float) -> set[int]:
        """Ranks without progress for hang_timeout_s. A rank that stopped answering polls is
        the culprit; peers blocked in a collective with it still answer, and are spared. When
        every stalled rank still answers (a deadlock, a stuck collective), all of them are
        hung."""
        stalled = {r for r, w in self._ranks.items()
                   if r not in ended and now - w.progressed_at > self.hang_timeout_s}
        if not stalled:
            return set()
        silent = {r for r in stalled if now - self._ranks[r].answered_at > self.hang_timeout_s}
        return silent or stalled
