"""Fault injection: kill a worker at a step, or in the middle of a save.

Vocabulary (the `chaos` config section): `kill_at(rank, step)` and `kill_during_save(rank,
step)`. Each entry fires once per run: the worker writes a marker into the run's storage just
before it SIGKILLs itself, and the driver hands each new attempt only the entries whose marker
is absent. Keeping the record in storage rather than in driver memory means a driver that is
restarted after a crash still knows what already fired.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.config import ChaosConfig


@dataclass(frozen=True)
class Fault:
    kind: str
    """'kill' or 'kill_during_save'."""
    rank: int
    step: int

    @property
    def marker(self) -> str:
        return f"{self.kind}-rank{self.rank}-step{self.step}"


def planned_faults(config: ChaosConfig) -> list[Fault]:
    return [Fault("kill", p.rank, p.step) for p in config.kill] + [
        Fault("kill_during_save", p.rank, p.step) for p in config.kill_during_save
    ]


def pending_faults(config: ChaosConfig, layout: RunLayout) -> list[Fault]:
    """The planned faults that have not fired yet in this run."""
    fired = {e.name for e in layout.storage.list_dir(*layout.chaos)}
    return [f for f in planned_faults(config) if f.marker not in fired]


class FaultInjector:
    """Runs inside a worker: fires this rank's pending faults at their hook points."""

    def __init__(self, faults: list[Fault], rank: int, layout: RunLayout) -> None:
        self._faults = {(f.kind, f.step): f for f in faults if f.rank == rank}
        self._layout = layout

    def on_step_end(self, step: int) -> None:
        self._fire(("kill", step))

    def on_shards_written(self, step: int) -> None:
        """Call after this rank's shards of `step` are on storage and before the commit."""
        self._fire(("kill_during_save", step))

    def _fire(self, key: tuple[str, int]) -> None:
        fault = self._faults.pop(key, None)
        if fault is None:
            return
        self._layout.storage.write_atomic(b"", *self._layout.chaos, fault.marker)
        os.kill(os.getpid(), signal.SIGKILL)
