"""One driver per run: a lease in the run's storage, with a fencing token.

    <storage>/<run>/lease/000000001.json    generation 1: holder, expiry
    <storage>/<run>/lease/000000002.json    generation 2 took over from 1 ...

The highest generation is the run's lease. A driver takes generation N+1 by creating its file
exclusively (a hard link on local disk, a PUT with If-None-Match on S3), and only when
generation N has expired, was released, or its holder is provably gone (a process on this
host that no longer exists). Of two drivers racing for N+1 exactly one wins. The holder
renews its record; the generation is the fencing token every commit carries: a commit checks
that no higher generation exists, so the workers of a driver that lost its lease never commit
after the takeover is written.

Expiry compares the holder's clock with the reader's: hosts are assumed to agree to well
under `run.lease_timeout_s` (NTP does that).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import psutil

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.errors import OrchestratorError

log = logging.getLogger(__name__)


class LeaseHeld(OrchestratorError):
    """Another driver holds this run: a scheduler started the job a second time, or the
    same `orchestrator run` was started twice. The message names the holder."""


class LeaseLost(OrchestratorError):
    """This driver's lease was taken over (it could not renew in time, and another driver
    took the run): it must stop, and its workers cannot commit."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_started: float
    """The holder process's start time: tells a reused pid from the holder."""
    ray_job_id: str
    since: float
    nonce: str

    @staticmethod
    def this_process(ray_job_id: str = "") -> "Holder":
        return Holder(host=socket.gethostname(), pid=os.getpid(),
                      process_started=psutil.Process().create_time(), ray_job_id=ray_job_id,
                      since=round(time.time(), 3), nonce=uuid.uuid4().hex)

    def describe(self) -> str:
        job = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return (f"pid {self.pid} on {self.host}{job}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}")


@dataclass(frozen=True)
class LeaseRecord:
    generation: int
    holder: Holder
    expires_at: float
    released: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> "LeaseRecord":
        raw = json.loads(data)
        holder = Holder(**{k: raw["holder"][k] for k in Holder.__dataclass_fields__})
        record = LeaseRecord(generation=int(raw["generation"]), holder=holder,
                             expires_at=float(raw["expires_at"]),
                             released=bool(raw.get("released", False)))
        return record


def holder_is_gone(holder: Holder) -> bool:
    """Whether the holder is provably dead: a process on this host that no longer exists (or
    whose pid now belongs to another process). On another host nothing is proven."""
    if holder.host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(holder.pid).create_time() - holder.process_started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def current_generation(layout: RunLayout) -> int:
    """The run's lease generation now (0: never leased): what a commit checks its token
    against. Reads one listing."""
    names = (e.name for e in layout.storage.list_dir(*layout.leases))
    gens = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
    return max(gens, default=0)


class RunLease:
    def __init__(self, layout: RunLayout, timeout_s: float,
                 clock: Callable[[], float] = time.time,
                 is_gone: Callable[[Holder], bool] = holder_is_gone) -> None:
        self._layout = layout
        self._timeout_s = timeout_s
        self._clock = clock
        self._is_gone = is_gone
        self.record: LeaseRecord | None = None
        self.took_over: LeaseRecord | None = None
        """The record this driver took over from (expired, released or its holder gone)."""

    @property
    def generation(self) -> int:
        return self.record.generation if self.record else 0

    def _read(self, generation: int) -> LeaseRecord | None:
        try:
            return LeaseRecord.from_json(
                self._layout.storage.read_bytes(*self._layout.lease(generation)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A record nobody can parse holds nothing: it is taken over like an expired one.
            log.warning("lease generation %d is unreadable (%s): treated as expired",
                        generation, type(e).__name__)
            return None

    def acquire(self, holder: Holder) -> LeaseRecord:
        """Take the run, or raise LeaseHeld naming who holds it."""
        generation = current_generation(self._layout)
        current = self._read(generation) if generation else None
        now = self._clock()
        if current is not None and not current.released and current.expires_at > now:
            if not self._is_gone(current.holder):
                raise LeaseHeld(
                    f"run {self._layout.run_name} is held by another driver "
                    f"({current.holder.describe()}); its lease expires in "
                    f"{current.expires_at - now:.0f} s unless renewed. Stop that driver, or "
                    "wait for it (run.lease_timeout_s)")
        record = LeaseRecord(generation=generation + 1, holder=holder,
                             expires_at=now + self._timeout_s)
        if not self._layout.storage.create_exclusive(record.to_json(),
                                                     *self._layout.lease(record.generation)):
            winner = self._read(record.generation)
            who = winner.holder.describe() if winner else "another driver"
            raise LeaseHeld(f"run {self._layout.run_name} was just taken by {who}")
        self.record, self.took_over = record, current
        return record

    def renew(self) -> None:
        """Push the expiry out; raise LeaseLost if a newer generation exists."""
        assert self.record is not None, "acquire() first"
        newest = current_generation(self._layout)
        if newest != self.record.generation:
            raise LeaseLost(f"the lease of run {self._layout.run_name} was taken over "
                            f"(generation {newest} after this driver's "
                            f"{self.record.generation})")
        self.record = LeaseRecord(generation=self.record.generation, holder=self.record.holder,
                                  expires_at=self._clock() + self._timeout_s)
        self._layout.storage.write_atomic(self.record.to_json(),
                                          *self._layout.lease(self.record.generation))

    def release(self) -> None:
        """Let the next driver take over at once (the generation file stays: the numbers
        only grow)."""
        if self.record is None or current_generation(self._layout) != self.record.generation:
            return
        self.record = LeaseRecord(generation=self.record.generation, holder=self.record.holder,
                                  expires_at=self._clock(), released=True)
        self._layout.storage.write_atomic(self.record.to_json(),
                                          *self._layout.lease(self.record.generation))


class LeaseKeeper:
    """Renews a held lease from a thread of its own, every third of its timeout, so that a
    control loop busy placing workers or backing off never lets it lapse. `lost` is set
    (with the reason) if a renewal finds the lease taken over; failed renewals (storage
    down) are retried, and if storage stays away past the timeout another driver may take
    the run: the next renewal then finds out."""

    def __init__(self, lease: RunLease, timeout_s: float) -> None:
        import threading

        self._lease = lease
        self._timeout_s = timeout_s
        self._interval_s = timeout_s / 3
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._renewed_at = time.monotonic()
        self.lost = ""
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s) and not self.lost:
            self._renew()

    def _renew(self) -> None:
        with self._lock:
            try:
                self._lease.renew()
                self._renewed_at = time.monotonic()
            except LeaseLost as e:
                self.lost = str(e)
            except Exception as e:  # noqa: BLE001 -- storage hiccup: try again next time
                log.warning("renewing the run's lease failed (%s); retrying in %.0f s",
                            type(e).__name__, self._interval_s)

    def check(self) -> str:
        """Why this driver no longer holds the run ("" while it does). If the lease may
        have lapsed (this process was frozen, or storage was away, for longer than the
        timeout), renew now before anything else is decided: it is then either still ours,
        or lost."""
        if not self.lost and time.monotonic() - self._renewed_at > self._timeout_s * 0.8:
            self._renew()
        return self.lost

    def close(self, release: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if release and not self.lost:
            try:
                self._lease.release()
            except Exception as e:  # noqa: BLE001 -- it will expire instead
                log.warning("releasing the run's lease failed (%s): it expires instead",
                            type(e).__name__)
