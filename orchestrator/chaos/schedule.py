"""The driver's view of a job's faults: which are still to fire, which are due now, and which
fired (their markers in storage). It decides; the driver carries out (driver.py).

A fault is pending until its marker exists, so a restarted driver never fires one twice. The
schedule hands each attempt its pending worker faults that are due by step, or whose time has
come; later ones (a time that comes mid-attempt, a request from `orchestrator chaos`) are
handed over mid-attempt by `due()`.
"""

from __future__ import annotations

from typing import Any

from orchestrator.chaos.plan import Fault
from orchestrator.chaos.requests import fired_markers, read_marker, read_request
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import is_temporary

Event = tuple[str, dict[str, Any]]


class ChaosSchedule:
    def __init__(self, faults: list[Fault], layout: RunLayout, started_at: float) -> None:
        """`started_at`: the job's start (epoch seconds); `at_s` counts from it. Markers
        already in storage were reported by the driver that saw them fire."""
        self._faults = {f.id: f for f in faults}
        self._layout = layout
        self.started_at = started_at
        self._fired: set[str] = set(fired_markers(layout))
        self._requests_seen: set[str] = set()
        self._skipped: set[str] = set()
        self._handed: set[str] = set()
        """Faults given to the running attempt (worker faults) or carried out (driver
        faults: once per driver)."""

    @property
    def faults(self) -> list[Fault]:
        return list(self._faults.values())

    def refresh(self) -> list[Event]:
        """Read storage for new markers and requests; the events they call for."""
        events: list[Event] = []
        # Markers only come from faults still to fire: a job with none lists one folder a
        # second (the requests), not two.
        names = fired_markers(self._layout) if self.pending() else []
        for name in names:
            if name in self._fired:
                continue
            self._fired.add(name)
            record = read_marker(self._layout, name)
            fault = self._faults.get(str(record.get("fault_id", name)))
            fields = {"fault_id": name, **record}
            if fault is not None:
                fields = {**fault.to_event(), **record}
            events.append(("fault_fired", fields))
        for entry in self._layout.storage.list_dir(*self._layout.chaos_requests):
            if is_temporary(entry.name):
                continue  # a request being written: its own name comes next
            if entry.name in self._requests_seen:
                continue
            self._requests_seen.add(entry.name)
            try:
                fault = read_request(self._layout, entry.name)
            except (ValueError, OSError) as e:
                events.append(("fault_request_refused",
                               {"request": entry.name[:120], "reason": str(e)[:300]}))
                continue
            if fault.id not in self._faults:
                self._faults[fault.id] = fault
                events.append(("fault_requested", fault.to_event()))
        return events

    def pending(self) -> list[Fault]:
        return [f for f in self._faults.values()
                if (f.spec.repeat or f.id not in self._fired) and f.id not in self._skipped]

    def skip(self, fault: Fault) -> None:
        """Never hand `fault` out again in this driver: it cannot be carried out here."""
        self._skipped.add(fault.id)

    def for_attempt(self, now: float) -> list[Fault]:
        """The worker faults a new attempt starts with."""
        self._handed = {i for i in self._handed if self._faults[i].by_driver}
        out = [f for f in self.pending() if not f.by_driver and self._time_has_come(f, now)]
        self._handed |= {f.id for f in out}
        return out

    def due(self, now: float, gang_step: int) -> list[Fault]:
        """Faults to carry out now: worker faults the running attempt was not given (their
        time came, or they were requested since), driver faults whose step or time came."""
        out = []
        for f in self.pending():
            if f.id in self._handed:
                continue
            ready = self._time_has_come(f, now)
            if f.by_driver and f.spec.at_step:
                ready = gang_step >= f.spec.at_step
            if ready:
                out.append(f)
                self._handed.add(f.id)
        return out

    def _time_has_come(self, fault: Fault, now: float) -> bool:
        return not fault.spec.at_s or now - self.started_at >= fault.spec.at_s
