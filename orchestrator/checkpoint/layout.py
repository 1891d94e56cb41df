"""Where things live inside a run's storage (the format contract of DESIGN.md).

    <storage>/<run_name>/
      checkpoints/step_000000120/   manifest.json (written last: the commit marker) and
        save-<id>/                  the DCP files of one save (format 1: in the step folder)
        invalid.json                written when a restore finds the files corrupt
      events.jsonl                  the run's event log
      summary.json                  written when the run ends
      chaos/                        one marker per injected fault that has fired (JSON)
      chaos-requests/               faults sent to the running job by `orchestrator chaos`
      probes/<token>/               the workers' start-up check that they share the storage
                                    (storage_probe.py), removed when it is done
"""

from __future__ import annotations

import re

from orchestrator.checkpoint.storage import Storage

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
INVALID = "invalid.json"
EVENTS = "events.jsonl"
EVENTS_SEGMENTS = "events"
SUMMARY = "summary.json"
CHAOS = "chaos"
CHAOS_REQUESTS = "chaos-requests"
LEASES = "lease"
PROBES = "probes"
SAVE_DIR_PREFIX = "save-"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir_name(step: int) -> str:
    if not 0 <= step < 10**9:
        raise ValueError(f"step {step} does not fit the 9-digit step directory format")
    return f"step_{step:09d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


class RunLayout:
    """Relative paths of one run inside a Storage."""

    def __init__(self, storage: Storage, run_name: str) -> None:
        self.storage = storage
        self.run_name = run_name

    def step_dir(self, step: int) -> tuple[str, ...]:
        return (self.run_name, CHECKPOINTS, step_dir_name(step))

    def data_dir(self, step: int, data_dir: str) -> tuple[str, ...]:
        """Folder of one save's DCP files ("" for format 1: the step folder itself)."""
        return (*self.step_dir(step), data_dir) if data_dir else self.step_dir(step)

    def manifest(self, step: int) -> tuple[str, ...]:
        return (*self.step_dir(step), MANIFEST)

    def invalid_marker(self, step: int) -> tuple[str, ...]:
        """Written beside a manifest whose files failed verification: the step is skipped,
        and may be saved again without `overwrite`."""
        return (*self.step_dir(step), INVALID)

    @property
    def checkpoints(self) -> tuple[str, ...]:
        return (self.run_name, CHECKPOINTS)

    @property
    def events(self) -> tuple[str, ...]:
        return (self.run_name, EVENTS)

    @property
    def events_segments(self) -> tuple[str, ...]:
        """The event log on object stores: numbered segments (events.py)."""
        return (self.run_name, EVENTS_SEGMENTS)

    def events_segment(self, index: int) -> tuple[str, ...]:
        return (self.run_name, EVENTS_SEGMENTS, f"{index:09d}.jsonl")

    @property
    def summary(self) -> tuple[str, ...]:
        return (self.run_name, SUMMARY)

    @property
    def chaos(self) -> tuple[str, ...]:
        return (self.run_name, CHAOS)

    @property
    def chaos_requests(self) -> tuple[str, ...]:
        return (self.run_name, CHAOS_REQUESTS)

    @property
    def leases(self) -> tuple[str, ...]:
        """One file per lease generation; the highest is the run's current lease."""
        return (self.run_name, LEASES)

    def lease(self, generation: int) -> tuple[str, ...]:
        return (self.run_name, LEASES, f"{generation:09d}.json")

    def step_dirs(self) -> list[int]:
        """Every step that has a directory, committed or not, in ascending numeric order."""
        steps = (parse_step_dir(e.name) for e in self.storage.list_dir(*self.checkpoints))
        return sorted(s for s in steps if s is not None)
