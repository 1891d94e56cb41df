"""The `chaos` config section: which faults to inject, and when (see FAULT_KINDS).

`FaultPlan` (plan.py) builds it; `orchestrator chaos` sends one `FaultSpec` to a running job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.config_checks import _require, _seconds


FAULT_KINDS: dict[str, str] = {
    "kill": "SIGKILL the rank's worker process (an OOM kill, a crash)",
    "preempt": "SIGTERM the rank's worker (a cloud's preemption notice): it checkpoints, stops",
    "drain": "ask Ray to drain the rank's node (a preemption notice for the whole node)",
    "hang": "SIGSTOP the rank's worker: the process stops answering (a wedged host)",
    "block": "block the rank's training thread forever (a deadlock); the process answers",
    "raise": "raise an exception in the workload (a bug in user code)",
    "fail_collective": "break the rank's process group: its collective fails, peers see it",
    "kill_during_save": "SIGKILL the worker after its shards are written, before the commit "
                        "(in the training thread, or the background writer of an async save)",
    "fail_reads": "the next `count` storage reads of the rank fail (EIO)",
    "fail_writes": "the next `count` storage writes of the rank fail (EIO)",
    "delay_reads": "the next `count` storage reads of the rank take `delay_s` longer",
    "delay_writes": "the next `count` storage writes of the rank take `delay_s` longer",
    "kill_node": "SIGKILL the raylet of the rank's node, then the worker (node loss; never "
                 "the driver's node)",
    "kill_driver": "SIGKILL the driver (a lost head process); `rank` is ignored",
}
"""Every fault the chaos vocabulary knows (orchestrator/chaos/), with what it does."""
STORAGE_FAULT_KINDS = ("fail_reads", "fail_writes", "delay_reads", "delay_writes")
DRIVER_FAULT_KINDS = ("drain", "kill_driver")
"""Carried out by the driver; every other kind by the rank's worker."""


@dataclass(kw_only=True, frozen=True)
class FaultSpec:
    """One fault to inject. With neither `at_step` nor `at_s` it fires at the first chance."""

    kind: str
    """One of FAULT_KINDS."""
    rank: int = 0
    """The rank it strikes."""
    at_step: int = 0
    """Fire when the rank finishes this step, or at the first hook after it (a save after
    it, for kill_during_save); 0: not by step."""
    at_s: float = 0.0
    """Fire this many seconds after the job started (its first driver's start); 0: not by
    time."""
    count: int = 1
    """Storage faults: how many operations fail or are delayed."""
    delay_s: float = 0.0
    """delay_reads and delay_writes: how much longer each operation takes."""
    repeat: bool = False
    """Fire in every attempt, not once per run: a bug in the code rather than a mishap."""

    def __post_init__(self) -> None:
        _require(self.kind in FAULT_KINDS, "chaos.faults.kind",
                 f"the kinds are {', '.join(FAULT_KINDS)}", self.kind)
        _require(self.rank >= 0, "chaos.faults.rank", "it must be >= 0", self.rank)
        _require(self.at_step >= 0, "chaos.faults.at_step", "it must be >= 0", self.at_step)
        _seconds("chaos.faults.at_s", self.at_s)
        _require(not (self.at_step and self.at_s), "chaos.faults",
                 "give at_step or at_s, not both", {"at_step": self.at_step, "at_s": self.at_s})
        _require(1 <= self.count <= 1_000_000, "chaos.faults.count",
                 "it must be from 1 to 1000000", self.count)
        _seconds("chaos.faults.delay_s", self.delay_s)
        _require(self.kind.startswith("delay_") == (self.delay_s > 0), "chaos.faults.delay_s",
                 "delay_reads and delay_writes need delay_s > 0, and only they take it",
                 self.delay_s)
        _require(not self.repeat or self.at_step > 0, "chaos.faults.repeat",
                 "a fault that repeats in every attempt needs at_step", self.repeat)


@dataclass(kw_only=True, frozen=True)
class RandomFaults:
    """Faults at random times: a Poisson process of `rate_per_min`, seeded, so that the same
    seed gives the same faults at the same times, ranks and kinds."""

    rate_per_min: float = 0.0
    """Mean faults per minute of the job's wall time; 0: none."""
    seed: int = 0
    max_faults: int = 10
    """At most this many in one job."""
    kinds: list[str] = field(default_factory=lambda: ["kill", "preempt", "hang", "raise"])
    """Drawn with equal weights."""
    start_s: float = 5.0
    """None in the job's first seconds (start-up)."""
    delay_s: float = 0.5
    """What drawn delay_reads and delay_writes faults add to each operation."""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.rate_per_min) and 0 <= self.rate_per_min <= 600,
                 "chaos.random.rate_per_min", "it must be from 0 to 600", self.rate_per_min)
        _require(0 <= self.max_faults <= 10_000, "chaos.random.max_faults",
                 "it must be from 0 to 10000", self.max_faults)
        bad = [k for k in self.kinds if k not in FAULT_KINDS]
        _require(not bad and (self.kinds or not self.rate_per_min), "chaos.random.kinds",
                 f"give some of {', '.join(FAULT_KINDS)}", self.kinds)
        _seconds("chaos.random.start_s", self.start_s)
        _seconds("chaos.random.delay_s", self.delay_s, zero_ok=False)


@dataclass(kw_only=True, frozen=True)
class ChaosConfig:
    """Faults to inject into this job (orchestrator/chaos/; `FaultPlan` builds this section,
    `orchestrator chaos` injects into a running job). Each fires once per run, whatever
    restarts or driver restarts happen, unless it repeats."""

    faults: list[FaultSpec] = field(default_factory=list)
    random: RandomFaults = field(default_factory=RandomFaults)
