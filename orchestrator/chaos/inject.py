"""Where a worker carries faults out: at the end of a step, after its shards of a save are
written, or at once when the driver hands one over mid-attempt.

Before a fault acts, its marker goes to `<run>/chaos/<fault id>` (JSON: who fired it, where,
at which step): the driver then never hands it out again, and turns the marker into a
`fault_fired` event. A fault that repeats writes one marker per attempt instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

from orchestrator.chaos.config import STORAGE_FAULT_KINDS
from orchestrator.chaos.plan import Fault
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import INJECTED

SIGNAL_KINDS = {"kill": signal.SIGKILL, "preempt": signal.SIGTERM, "hang": signal.SIGSTOP}
"""Faults that act on the whole process, so they may fire from any thread, at once."""


class InjectedFault(RuntimeError):
    """The workload 'raised': a `raise` fault (to the failure policy, a user error)."""


class FaultInjector:
    """Fires this rank's faults at their hook points. `add` may come from another thread (the
    driver's `inject` call on the actor); the hooks run on the training thread, or on the
    background writer for `on_shards_written`."""

    def __init__(self, faults: list[Fault], rank: int, layout: RunLayout | None,
                 attempt: int = 0) -> None:
        self._rank = rank
        self._layout = layout
        self._attempt = attempt
        self._lock = threading.Lock()
        self._faults = [f for f in faults if f.rank == rank and not f.by_driver]
        self._step = 0

    def add(self, fault: Fault) -> None:
        """A fault sent mid-attempt: a signal without a step fires now, anything else at its
        hook point."""
        if fault.rank != self._rank or fault.by_driver:
            return
        if fault.kind in SIGNAL_KINDS and not fault.spec.at_step:
            self._fire(fault, self._step)
            return
        with self._lock:
            self._faults.append(fault)

    def on_step_end(self, step: int) -> None:
        self._step = step
        for fault in self._take(lambda f: f.kind != "kill_during_save", step):
            self._fire(fault, step)

    def on_shards_written(self, step: int) -> None:
        """Call after this rank's shards of `step` are on storage and before the commit."""
        for fault in self._take(lambda f: f.kind == "kill_during_save", step):
            self._fire(fault, step)

    def _take(self, hook, step: int) -> list[Fault]:
        with self._lock:
            due = [f for f in self._faults if hook(f) and f.spec.at_step <= step]
            self._faults = [f for f in self._faults if f not in due]
        return due

    def _fire(self, fault: Fault, step: int) -> None:
        self._record(fault, step)
        kind = fault.kind
        if kind in SIGNAL_KINDS:
            os.kill(os.getpid(), SIGNAL_KINDS[kind])
        elif kind == "kill_during_save":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "kill_node":
            _kill_raylet()
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind in STORAGE_FAULT_KINDS:
            op = "read" if kind.endswith("_reads") else "write"
            INJECTED.arm(op, fault.spec.count, fault.spec.delay_s)
        elif kind == "block":
            threading.Event().wait()  # the training thread is stuck; the process answers
        elif kind == "raise":
            # The same words on every rank: a bug in every rank's code is one grouped error.
            raise InjectedFault(f"injected fault: raise at step {step} ({fault.source})")
        elif kind == "fail_collective":
            _break_process_group()
            raise _collective_error(f"injected fault {fault.id}: the collective failed: "
                                    f"Connection reset by peer")

    def _record(self, fault: Fault, step: int) -> None:
        if self._layout is not None:
            write_marker(self._layout, fault, rank=self._rank, step=step, attempt=self._attempt)


def write_marker(layout: RunLayout, fault: Fault, *, rank: int, step: int, attempt: int) -> None:
    """Record that `fault` fires now: before it acts, since it may end this process."""
    name = f"{fault.id}-attempt{attempt}" if fault.spec.repeat else fault.id
    record = {"fault_id": fault.id, "fault_kind": fault.kind, "rank": rank, "step": step,
              "attempt": attempt, "source": fault.source, "pid": os.getpid(),
              "host": socket.gethostname(), "fired_at": round(time.time(), 3)}
    layout.storage.write_atomic(json.dumps(record).encode(), *layout.chaos, name)


def _kill_raylet() -> None:
    """A node dies with its raylet: the worker's parent (or an ancestor) on a Ray node."""
    import psutil

    for process in psutil.Process().parents():
        if process.name().startswith("raylet"):
            process.kill()
            return


def _break_process_group() -> None:
    """Close this rank's connections to its peers: their next collective with it fails."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_error(message: str) -> Exception:
    import torch.distributed as dist

    return dist.DistNetworkError(message)
