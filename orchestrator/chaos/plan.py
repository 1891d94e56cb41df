"""The one vocabulary for injecting faults: `FaultPlan`.

    plan = FaultPlan().kill_at(rank=1, step=12).hang_at(rank=0, step=30)
    JobConfig(chaos=plan.chaos_config())      # or the YAML section: plan.config()
    plan = FaultPlan().random(rate_per_min=4, seed=7, max_faults=12)

The config section (chaos/config.py), the `orchestrator chaos` CLI (one `FaultSpec` sent to a
running job) and the tests all speak it. `faults()` turns a plan into the concrete `Fault`s of
one job: each with an id that names its marker in storage (so it fires once per run, across
restarts and driver restarts) and with who asked for it. Pure: nothing here touches storage,
Ray or a process.
"""

from __future__ import annotations

import dataclasses
import random as _random
from dataclasses import dataclass
from typing import Any

from orchestrator.chaos.config import (DRIVER_FAULT_KINDS, ChaosConfig, FaultSpec,
                                       RandomFaults)


@dataclass(frozen=True)
class Fault:
    """A fault of one job: what to do (`spec`), its id, and who injected it."""

    spec: FaultSpec
    id: str
    """Unique in the run; the name of the marker written when it fires."""
    source: str
    """Who injected it: 'config', 'random (seed 7)', or the `orchestrator chaos` caller."""

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def by_driver(self) -> bool:
        return self.spec.kind in DRIVER_FAULT_KINDS

    def describe(self) -> str:
        s = self.spec
        when = (f"at step {s.at_step}" if s.at_step else f"at {s.at_s:g} s" if s.at_s
                else "at the first chance")
        who = "the driver" if s.kind == "kill_driver" else f"rank {s.rank}"
        return f"{s.kind} {who} {when}"

    def to_event(self) -> dict[str, Any]:
        spec = _non_default(self.spec)
        return {"fault_id": self.id, "source": self.source, "fault_kind": spec.pop("kind"),
                "rank": self.spec.rank, **spec}


class FaultPlan:
    """Faults to inject into one job, built by chaining. Steps count from 1; `at_s` counts
    seconds from the job's start. Each fault fires once per run unless it repeats."""

    def __init__(self, faults: list[FaultSpec] | None = None,
                 random: RandomFaults | None = None) -> None:
        self._faults = list(faults or [])
        self._random = random or RandomFaults()

    # --- the vocabulary --------------------------------------------------------------------

    def add(self, kind: str, rank: int = 0, step: int = 0, *, at_s: float = 0.0,
            count: int = 1, delay_s: float = 0.0, repeat: bool = False) -> FaultPlan:
        self._faults.append(FaultSpec(kind=kind, rank=rank, at_step=step, at_s=at_s,
                                      count=count, delay_s=delay_s, repeat=repeat))
        return self

    def kill_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("kill", rank, step, at_s=at_s)

    def preempt_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("preempt", rank, step, at_s=at_s)

    def drain_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("drain", rank, step, at_s=at_s)

    def hang_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("hang", rank, step, at_s=at_s)

    def block_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("block", rank, step, at_s=at_s)

    def raise_at(self, rank: int, step: int = 0, *, at_s: float = 0.0,
                 repeat: bool = False) -> FaultPlan:
        return self.add("raise", rank, step, at_s=at_s, repeat=repeat)

    def fail_collective_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("fail_collective", rank, step, at_s=at_s)

    def kill_during_save(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("kill_during_save", rank, step, at_s=at_s)

    def fail_reads(self, rank: int, count: int = 1, *, step: int = 0,
                   at_s: float = 0.0) -> FaultPlan:
        return self.add("fail_reads", rank, step, at_s=at_s, count=count)

    def fail_writes(self, rank: int, count: int = 1, *, step: int = 0,
                    at_s: float = 0.0) -> FaultPlan:
        return self.add("fail_writes", rank, step, at_s=at_s, count=count)

    def delay_reads(self, rank: int, delay_s: float, count: int = 1, *, step: int = 0,
                    at_s: float = 0.0) -> FaultPlan:
        return self.add("delay_reads", rank, step, at_s=at_s, count=count, delay_s=delay_s)

    def delay_writes(self, rank: int, delay_s: float, count: int = 1, *, step: int = 0,
                     at_s: float = 0.0) -> FaultPlan:
        return self.add("delay_writes", rank, step, at_s=at_s, count=count, delay_s=delay_s)

    def kill_node_at(self, rank: int, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("kill_node", rank, step, at_s=at_s)

    def kill_driver_at(self, step: int = 0, *, at_s: float = 0.0) -> FaultPlan:
        return self.add("kill_driver", 0, step, at_s=at_s)

    def random(self, rate_per_min: float, *, seed: int = 0, max_faults: int = 10,
               kinds: list[str] | None = None, start_s: float = 5.0) -> FaultPlan:
        """Faults at the times of a seeded Poisson process, of kinds drawn with equal
        weights, on ranks drawn uniformly."""
        self._random = RandomFaults(rate_per_min=rate_per_min, seed=seed,
                                    max_faults=max_faults,
                                    kinds=list(kinds or RandomFaults().kinds), start_s=start_s)
        return self

    # --- as config, and as the faults of one job -------------------------------------------

    def chaos_config(self) -> ChaosConfig:
        return ChaosConfig(faults=list(self._faults), random=self._random)

    def config(self) -> dict[str, Any]:
        """The `chaos` section as plain data (YAML, `--set chaos=...`), defaults left out."""
        out: dict[str, Any] = {"faults": [_non_default(f) for f in self._faults]}
        if self._random.rate_per_min:
            out["random"] = _non_default(self._random)
        return out

    @staticmethod
    def from_config(config: ChaosConfig) -> FaultPlan:
        return FaultPlan(config.faults, config.random)

    def faults(self, num_workers: int) -> list[Fault]:
        """The concrete faults of a job with `num_workers` ranks, random ones drawn."""
        out: list[Fault] = []
        seen: dict[str, int] = {}
        for spec in self._faults:
            base = _id_of(spec)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}-{seen[base]}"
            out.append(Fault(spec=spec, id=name, source="config"))
        return out + random_faults(self._random, num_workers)


def random_faults(config: RandomFaults, num_workers: int) -> list[Fault]:
    """The faults of a seeded Poisson process: the same seed, the same faults."""
    if not config.rate_per_min or not config.max_faults:
        return []
    rng = _random.Random(config.seed)
    at_s, out = config.start_s, []
    for i in range(config.max_faults):
        at_s += rng.expovariate(config.rate_per_min / 60.0)
        kind = rng.choice(config.kinds)
        rank = rng.randrange(num_workers)
        spec = FaultSpec(kind=kind, rank=rank, at_s=round(at_s, 3),
                         delay_s=config.delay_s if kind.startswith("delay_") else 0.0)
        out.append(Fault(spec=spec, id=f"random{config.seed}-{i:03d}-{_id_of(spec)}",
                         source=f"random (seed {config.seed})"))
    return out


def _id_of(spec: FaultSpec) -> str:
    when = (f"step{spec.at_step}" if spec.at_step else f"at{spec.at_s:g}s" if spec.at_s
            else "first")
    return f"{spec.kind}-rank{spec.rank}-{when}"


def _non_default(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.name == "kind" or getattr(obj, f.name) != _default_of(f)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING

