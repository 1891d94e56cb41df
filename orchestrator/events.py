"""The run's event log (events.jsonl) and its goodput accounting (summary.json).

The driver is the only writer. On local disk each event is appended and flushed as it happens;
object stores cannot append, so there the whole log is rewritten on each flush (the log is
small: events are per attempt and per checkpoint, never per step).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint.layout import RunLayout


_SECRET_KEY = re.compile(r"key|secret|token|password", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """`value` with whatever sits under a key that looks secret (api_key, aws_secret,
    hf_token, db_password, ...) replaced: config values and event fields are written to
    storage and logs that more people can read than the job's credentials."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


class EventLog:
    def __init__(self, layout: RunLayout, clock=time.time) -> None:
        self._layout = layout
        self._clock = clock
        storage = layout.storage
        self._lines: list[str] = []
        if storage.exists(*layout.events):  # a resumed run keeps its history
            self._lines = storage.read_bytes(*layout.events).decode().splitlines()
        self._path = storage.path(*layout.events)
        if storage.is_local:
            storage.makedirs(layout.run_name)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": round(self._clock(), 3), "kind": kind, **redact(fields)}
        line = json.dumps(event, default=str)
        self._lines.append(line)
        storage = self._layout.storage
        if storage.is_local:
            with open(self._path, "a") as f:
                f.write(line + "\n")
        else:
            storage.write_atomic(("\n".join(self._lines) + "\n").encode(), *self._layout.events)
        return event

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self._lines if line.strip()]
        return [e for e in parsed if kind is None or e["kind"] == kind]


def read_events(layout: RunLayout) -> list[dict[str, Any]]:
    data = layout.storage.read_bytes(*layout.events).decode()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@dataclass
class Goodput:
    """Which step computations were kept and which were thrown away by restarts.

    A step's time counts as good when the final model descends from it: steps computed after
    the checkpoint a restart resumes from are lost and get recomputed.
    """

    started_at: float
    step_time_s: dict[int, float] = field(default_factory=dict)
    """Latest duration of each step on rank 0, for the lineage that is still alive."""
    lost_steps: int = 0
    highest_step: int = 0

    def record_step(self, step: int, duration_s: float) -> None:
        self.step_time_s[step] = duration_s
        self.highest_step = max(self.highest_step, step)

    def record_reached(self, step: int) -> None:
        """The gang is known to have got to `step` (its durations may never have arrived)."""
        self.highest_step = max(self.highest_step, step)

    def record_restore(self, step: int) -> None:
        """The gang resumed from `step`: everything computed after it was lost."""
        lost = [s for s in self.step_time_s if s > step]
        self.lost_steps += max(self.highest_step - step, 0)
        for s in lost:
            del self.step_time_s[s]
        self.highest_step = step

    def summary(self, now: float) -> dict[str, Any]:
        wall_s = max(now - self.started_at, 1e-9)
        kept_s = sum(self.step_time_s.values())
        return {
            "steps_completed": self.highest_step,
            "lost_steps": self.lost_steps,
            "wall_s": round(wall_s, 3),
            "goodput": round(kept_s / wall_s, 4),
        }
