"""The run's lease (against real files, with a fake clock) and what a new driver takes over
from the event log (a pure function)."""

from __future__ import annotations

import threading

import pytest

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.continuation import continuation
from orchestrator.lease import Holder, LeaseHeld, LeaseLost, RunLease, current_generation


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def holder(pid: int) -> Holder:
    return Holder(host="h", pid=pid, process_started=1.0, ray_job_id="", since=0.0,
                  nonce=f"n{pid}")


@pytest.fixture
def layout(tmp_path):
    return RunLayout(Storage(str(tmp_path)), "run")


def test_a_held_lease_refuses_a_second_driver_until_it_expires(layout):
    clock = Clock()
    first = RunLease(layout, 30, clock=clock, is_gone=lambda h: False)
    assert first.acquire(holder(1)).generation == 1
    with pytest.raises(LeaseHeld, match=r"held by another driver \(pid 1 on h"):
        RunLease(layout, 30, clock=clock, is_gone=lambda h: False).acquire(holder(2))
    clock.now += 20
    first.renew()  # pushed out to now + 30
    clock.now += 20
    with pytest.raises(LeaseHeld):
        RunLease(layout, 30, clock=clock, is_gone=lambda h: False).acquire(holder(2))
    clock.now += 11  # expired
    second = RunLease(layout, 30, clock=clock, is_gone=lambda h: False)
    assert second.acquire(holder(2)).generation == 2
    assert second.took_over.holder.pid == 1
    with pytest.raises(LeaseLost, match="generation 2 after this driver's 1"):
        first.renew()
    first.release()  # a driver that lost the lease releases nothing
    assert current_generation(layout) == 2


def test_a_provably_gone_holder_or_a_released_lease_is_taken_over_at_once(layout):
    clock = Clock()
    RunLease(layout, 30, clock=clock, is_gone=lambda h: False).acquire(holder(1))
    gone = RunLease(layout, 30, clock=clock, is_gone=lambda h: h.pid == 1)
    assert gone.acquire(holder(2)).generation == 2
    gone.release()
    third = RunLease(layout, 30, clock=clock, is_gone=lambda h: False)
    assert third.acquire(holder(3)).generation == 3


def test_of_drivers_racing_for_an_expired_lease_exactly_one_wins(layout):
    clock = Clock()
    RunLease(layout, 1, clock=clock, is_gone=lambda h: False).acquire(holder(1))
    clock.now += 5
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def race(pid: int) -> None:
        barrier.wait()
        try:
            RunLease(layout, 30, clock=clock, is_gone=lambda h: False).acquire(holder(pid))
            outcomes.append("won")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=race, args=(10 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1 and current_generation(layout) == 2


def ev(kind: str, **fields) -> dict:
    return {"kind": kind, **fields}


FAILURE = {"failure_kind": "worker_died", "rank": 1, "step": 7, "message": "died",
           "attempt": 0}


def test_a_job_whose_driver_died_is_continued_with_its_history():
    events = [ev("job_start", job_id="old"), ev("job_end", status="succeeded"),
              ev("job_start", job_id="j1"), ev("workers_started", attempt=0),
              ev("failure", **FAILURE), ev("decision", attempt=0, progress_s=12.5),
              ev("restart", attempt=1), ev("checkpoint_committed", step=10, rank=0),
              ev("failure", **{**FAILURE, "attempt": 1, "failure_kind": "bogus"}),  # skipped
              ev("failure", rank="x")]  # malformed: skipped
    c = continuation(events)
    assert c.continuing and c.job_id == "j1" and c.committed and c.next_attempt == 2
    (incident,) = c.incidents
    assert incident.attempt == 0 and incident.progress_s == 12.5
    assert incident.failures[0].kind.value == "worker_died"


@pytest.mark.parametrize("events", [
    [], [ev("job_start", job_id="j"), ev("job_end")], [ev("job_start")],  # no id: too old
    [ev("job_start", job_id=5)],
])
def test_an_ended_or_unknown_job_is_not_continued(events):
    assert not continuation(events).continuing
