"""How often the memory tier copies with `checkpoint.memory_interval_steps: auto` (the
default): as often as the copies cost at most COST_BUDGET of the training time.

What a copy costs depends on what the machine has to spare: on a GPU node the snapshot and
the buddy exchange run on CPU cores the training leaves idle, and cost a step little; on a
node whose CPUs are the training's (this repository's test machine: two ranks on two cores)
every byte copied is taken from a step (bench/memory_tier.py: 1.7x with a copy after every
step of a 13 ms GPT step). So the tier measures instead of guessing. At the start of a run
each rank times PROBE_STEPS steps without a copy, then PROBE_STEPS steps each with a copy
of the step before in flight; what a step with a copy takes beyond one without is the cost
of a copy, and `interval_for` turns it into an interval. The ranks take the largest proposal
(one small all-reduce, once), and keep it across attempts (a replacement learns it at the
restore's gather). A failure then costs at most the interval's steps, which together take
about cost / COST_BUDGET seconds: the same time the copies would have cost at interval 1.

Pure, apart from the clock readings it is given.
"""

from __future__ import annotations

import math
import statistics

COST_BUDGET = 0.05
"""The share of a step's time that the copies may take, on average."""

PROBE_STEPS = 4
"""Steps timed without a copy, then as many with one (medians: a step's time varies)."""

MAX_INTERVAL = 1000
"""Copies so costly that a longer interval is needed are worth little next to storage's."""


def interval_for(step_s: float, step_with_copy_s: float, budget: float = COST_BUDGET) -> int:
    """Steps between copies so that their cost, spread over the interval, stays within
    `budget` of a step: the cost is what a step with a copy in flight takes beyond one
    without (never below 1 step; a copy that costs nothing measurable gives 1)."""
    if not (step_s > 0 and math.isfinite(step_s) and math.isfinite(step_with_copy_s)):
        return 1
    cost_s = max(step_with_copy_s - step_s, 0.0)
    return max(1, min(MAX_INTERVAL, math.ceil(cost_s / (budget * step_s))))


class CopyPace:
    """The probe of one attempt: `tick()` at the end of each step (every rank, the same
    steps) says whether to copy that step; once `measured`, `proposal()` is this rank's
    interval."""

    def __init__(self, probe_steps: int = PROBE_STEPS) -> None:
        self._probe = probe_steps
        self._ticks: list[float] = []

    def tick(self, now: float) -> bool:
        """The end of a step at `now` (monotonic): whether to copy it while probing. Ticks
        1..p+1 have no copy in flight (p intervals between them); ticks p+1..2p copy, so
        each of the p intervals up to tick 2p+1 has the copy of the step before in flight."""
        self._ticks.append(now)
        return self._probe + 1 <= len(self._ticks) <= 2 * self._probe

    @property
    def measured(self) -> bool:
        return len(self._ticks) >= 2 * self._probe + 1

    def step_times(self) -> tuple[float, float]:
        """Median step time without, and with, a copy in flight."""
        p, t = self._probe, self._ticks
        without = [b - a for a, b in zip(t[:p], t[1:p + 1])]
        with_copy = [b - a for a, b in zip(t[p:2 * p], t[p + 1:2 * p + 1])]
        return statistics.median(without), statistics.median(with_copy)

    def proposal(self) -> int:
        return interval_for(*self.step_times())
