"""The run's event log.

The driver is the only writer. On local disk the log is `events.jsonl`, and each event is
appended as it happens. Object stores cannot append, and rewriting the whole log per event
costs the square of the run's length, so there the log is a folder of numbered segments,
`events/000000001.jsonl`, ...: a flush rewrites only the current segment, which is closed
at SEGMENT_LINES lines, so an event costs the same at the end of a long run as at its start.
High-rate events (progress) are buffered and flushed with the next other event or every
FLUSH_INTERVAL_S; everything else is flushed at once. `read_events` reads either layout
back as one log.

A write that fails (storage away) never stops the driver: the events stay in memory, a
warning says so, and the next flush writes them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Callable

from orchestrator.checkpoint.layout import RunLayout

log = logging.getLogger(__name__)

SEGMENT_LINES = 500
FLUSH_INTERVAL_S = 10.0
BUFFERED_KINDS = frozenset({"progress", "state", "checkpoint_stall"})
_SEGMENT = re.compile(r"^(\d{9})\.jsonl$")


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
    def __init__(self, layout: RunLayout, clock=time.time,
                 monotonic=time.monotonic) -> None:
        self._layout = layout
        self._clock = clock
        self._monotonic = monotonic
        storage = layout.storage
        self._local = storage.is_local
        self._lines: list[str] = read_event_lines(layout)  # a resumed run keeps its history
        self._pending: list[str] = []
        """Emitted, not yet in storage."""
        self._last_flush = monotonic()
        self._failing = False
        self._watchers: list[Callable[[dict[str, Any]], None]] = []
        if self._local:
            storage.makedirs(layout.run_name)
            self._path = storage.path(*layout.events)
        else:
            segments = _segments(layout)
            self._segment = max(segments, default=0) + 1
            self._segment_lines: list[str] = []

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": round(self._clock(), 3), "kind": kind, **redact(fields)}
        line = json.dumps(event, default=str)
        self._lines.append(line)
        self._pending.append(line)
        if (kind not in BUFFERED_KINDS
                or self._monotonic() - self._last_flush >= FLUSH_INTERVAL_S):
            self.flush()
        for watcher in self._watchers:
            try:
                watcher(event)
            except Exception:  # noqa: BLE001 -- a display or a metric never stops the job
                log.exception("an event watcher failed on a %s event; it is dropped", kind)
                self._watchers.remove(watcher)
                break
        return event

    def subscribe(self, watcher: Callable[[dict[str, Any]], None]) -> None:
        """Call `watcher(event)` with every event emitted from now on, in order (the progress
        display, metrics, the goodput ledger)."""
        self._watchers.append(watcher)

    def flush(self) -> bool:
        """Write what is pending; False (and a warning) if storage refused."""
        if not self._pending:
            return True
        try:
            if self._local:
                with open(self._path, "a") as f:
                    f.write("".join(line + "\n" for line in self._pending))
            else:
                lines = self._segment_lines + self._pending
                self._layout.storage.write_atomic(
                    ("\n".join(lines) + "\n").encode(),
                    *self._layout.events_segment(self._segment))
                self._segment_lines = lines
                if len(lines) >= SEGMENT_LINES:
                    self._segment, self._segment_lines = self._segment + 1, []
        except Exception as e:  # noqa: BLE001 -- the log must never take the driver down
            if not self._failing:
                log.warning("writing the event log failed (%s: %s); %d events kept in "
                            "memory and written when storage answers again",
                            type(e).__name__, getattr(e, "strerror", None) or str(e)[:200],
                            len(self._pending))
            self._failing = True
            return False
        if self._failing:
            log.warning("the event log is written again")
        self._failing = False
        self._pending = []
        self._last_flush = self._monotonic()
        return True

    @property
    def unwritten(self) -> int:
        return len(self._pending)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self._lines if line.strip()]
        return [e for e in parsed if kind is None or e["kind"] == kind]


def _segments(layout: RunLayout) -> list[int]:
    names = (e.name for e in layout.storage.list_dir(*layout.events_segments))
    return sorted(int(m.group(1)) for n in names if (m := _SEGMENT.match(n)))


def read_event_lines(layout: RunLayout) -> list[str]:
    """The run's log as lines, oldest first, whichever layout it was written in (a run that
    moved between storages, or an older orchestrator's events.jsonl, reads whole)."""
    storage = layout.storage
    lines: list[str] = []
    if storage.exists(*layout.events):
        lines += storage.read_bytes(*layout.events).decode().splitlines()
    for i in _segments(layout):
        lines += storage.read_bytes(*layout.events_segment(i)).decode().splitlines()
    return [line for line in lines if line.strip()]


def read_events(layout: RunLayout) -> list[dict[str, Any]]:
    events = []
    for line in read_event_lines(layout):
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a torn or foreign line: the log is read from untrusted storage
    return events


def has_event_log(layout: RunLayout) -> bool:
    """Whether a run lives here: it has an event log, in either layout."""
    return layout.storage.exists(*layout.events) or bool(_segments(layout))
