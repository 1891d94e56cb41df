"""The chaos vocabulary: FaultPlan as config and as a job's faults, random faults, the
driver's schedule, requests from outside (untrusted), and the worker's injector in-process
for the faults that do not end the process."""

from __future__ import annotations

import collections
import json
import uuid

import pytest

from orchestrator.chaos import FAULT_KINDS, FaultPlan, FaultSpec
from orchestrator.chaos.inject import FaultInjector, InjectedFault
from orchestrator.chaos.plan import random_faults
from orchestrator.chaos.requests import fired_markers, read_marker, request_fault
from orchestrator.chaos.schedule import ChaosSchedule
from orchestrator.checkpoint import storage as storage_module
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import INJECTED, Storage
from orchestrator.config import JobConfig, from_dict
from orchestrator.chaos.config import RandomFaults


@pytest.fixture
def layout():
    return RunLayout(Storage(f"memory://chaos-{uuid.uuid4().hex}"), "run")


def test_a_plan_is_the_config_section_and_back():
    plan = (FaultPlan().kill_at(rank=1, step=12).hang_at(rank=0, step=30)
            .delay_writes(rank=1, delay_s=0.5, count=3, step=4).kill_driver_at(at_s=60)
            .random(rate_per_min=2, seed=7, max_faults=3))
    section = plan.config()
    assert section["faults"][0] == {"kind": "kill", "rank": 1, "at_step": 12}
    assert section["random"] == {"rate_per_min": 2, "seed": 7, "max_faults": 3}
    config = from_dict(JobConfig, {"scaling": {"num_workers": 2}, "chaos": section})
    again = FaultPlan.from_config(config.chaos)
    assert [f.id for f in again.faults(2)] == [f.id for f in plan.faults(2)]
    assert [f.id for f in plan.faults(2)][:4] == [
        "kill-rank1-step12", "hang-rank0-step30", "delay_writes-rank1-step4",
        "kill_driver-rank0-at60s"]


def test_every_kind_has_a_plan_method_and_is_documented():
    plan = (FaultPlan().kill_at(0, 1).preempt_at(0, 1).drain_at(0, 1).hang_at(0, 1)
            .block_at(0, 1).raise_at(0, 1).fail_collective_at(0, 1).kill_during_save(0, 1)
            .fail_reads(0, step=1).fail_writes(0, step=1).delay_reads(0, 1.0, step=1)
            .delay_writes(0, 1.0, step=1).kill_node_at(0, 1).kill_driver_at(1))
    assert [f.kind for f in plan.faults(1)] == list(FAULT_KINDS)
    docs = open("docs/config.md").read()
    assert all(f"`{kind}`" in docs for kind in FAULT_KINDS)


def test_the_same_fault_twice_gets_two_ids():
    ids = [f.id for f in FaultPlan().raise_at(1, 6).raise_at(1, 6).faults(2)]
    assert ids == ["raise-rank1-step6", "raise-rank1-step6-2"]


def test_random_faults_are_a_seeded_poisson_process_of_equal_weights():
    config = RandomFaults(rate_per_min=6, seed=3, max_faults=400,
                          kinds=["kill", "preempt", "hang", "raise"], start_s=5)
    faults = random_faults(config, num_workers=4)
    assert [f.id for f in faults] == [f.id for f in random_faults(config, 4)]  # same seed
    other = random_faults(RandomFaults(rate_per_min=6, seed=4, max_faults=400), 4)
    assert [f.spec.at_s for f in faults] != [f.spec.at_s for f in other]
    times = [f.spec.at_s for f in faults]
    assert times == sorted(times) and times[0] > 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 8 < sum(gaps) / len(gaps) < 12  # 6 a minute: a mean gap of 10 s
    kinds = collections.Counter(f.kind for f in faults)
    assert set(kinds) == set(config.kinds) and min(kinds.values()) > 70  # ~100 each
    assert {f.rank for f in faults} == {0, 1, 2, 3}
    assert all(f.source == "random (seed 3)" for f in faults)


def test_the_schedule_hands_out_step_faults_at_start_and_time_faults_when_due(layout):
    plan = FaultPlan().kill_at(1, step=5).kill_at(0, at_s=30).kill_driver_at(step=8)
    schedule = ChaosSchedule(plan.faults(2), layout, started_at=1000.0)
    assert [f.id for f in schedule.for_attempt(now=1010.0)] == ["kill-rank1-step5"]
    assert schedule.due(now=1010.0, gang_step=3) == []
    assert [f.id for f in schedule.due(now=1031.0, gang_step=3)] == ["kill-rank0-at30s"]
    assert [f.id for f in schedule.due(now=1031.0, gang_step=8)] == ["kill_driver-rank0-step8"]
    assert schedule.due(now=1040.0, gang_step=9) == []  # each handed out once
    # A new attempt gets again what has not fired, the driver's own faults excepted.
    assert {f.id for f in schedule.for_attempt(now=1041.0)} == {"kill-rank1-step5",
                                                                  "kill-rank0-at30s"}


def test_fired_faults_are_reported_once_and_never_handed_out_again(layout):
    plan = FaultPlan().kill_at(1, step=5).raise_at(0, step=2, repeat=True)
    faults = {f.id: f for f in plan.faults(2)}
    injector = FaultInjector(list(faults.values()), rank=0, layout=layout, attempt=0)
    with pytest.raises(InjectedFault, match="raise at step 2 \\(config\\)"):
        injector.on_step_end(2)
    layout.storage.write_atomic(json.dumps({"fault_id": "kill-rank1-step5", "rank": 1,
                                            "step": 5, "pid": 42}).encode(),
                                *layout.chaos, "kill-rank1-step5")
    schedule = ChaosSchedule(list(faults.values()), layout, started_at=0.0)  # a new driver
    assert schedule.refresh() == []  # what fired before it started was reported already
    assert [f.id for f in schedule.for_attempt(0.0)] == ["raise-rank0-step2"]  # repeats
    later = FaultInjector([], rank=0, layout=layout, attempt=1)
    later.add(faults["raise-rank0-step2"])  # sent mid-attempt: fires at the next step end
    with pytest.raises(InjectedFault):
        later.on_step_end(3)
    events = schedule.refresh()
    assert [(k, e["fault_id"], e["attempt"]) for k, e in events] == [
        ("fault_fired", "raise-rank0-step2", 1)]
    assert events[0][1]["source"] == "config" and events[0][1]["fault_kind"] == "raise"
    assert sorted(fired_markers(layout)) == ["kill-rank1-step5", "raise-rank0-step2-attempt0",
                                             "raise-rank0-step2-attempt1"]


def test_a_request_from_outside_is_validated_and_a_bad_one_refused(layout):
    schedule = ChaosSchedule([], layout, started_at=0.0)
    sent = request_fault(layout, FaultSpec(kind="hang", rank=1), injected_by="ana@box")
    folder = layout.chaos_requests
    layout.storage.write_atomic(b"{not json", *folder, "cli-1-bad.json")
    layout.storage.write_atomic(json.dumps({"fault": {"kind": "rm -rf"}}).encode(), *folder,
                                "cli-2-kind.json")
    layout.storage.write_atomic(b" " * 20_000, *folder, "cli-3-big.json")
    layout.storage.write_atomic(b"{}", *folder, "notes.json")
    events = schedule.refresh()
    requested = [e for k, e in events if k == "fault_requested"]
    refused = {e["request"]: e["reason"] for k, e in events if k == "fault_request_refused"}
    assert [(e["fault_id"], e["fault_kind"], e["rank"], e["source"]) for e in requested] == [
        (sent.id, "hang", 1, "orchestrator chaos by ana@box")]
    assert "not JSON" in refused["cli-1-bad.json"]
    assert "chaos.faults.kind" in refused["cli-2-kind.json"]
    assert "bytes" in refused["cli-3-big.json"]
    assert "not a request file name" in refused["notes.json"]
    assert [f.id for f in schedule.due(now=0.0, gang_step=1)] == [sent.id]  # at once
    assert schedule.refresh() == []  # each request read once


def test_markers_someone_else_wrote_are_read_as_untrusted(layout):
    layout.storage.write_atomic(b"\xff" * 10, *layout.chaos, "junk")
    layout.storage.write_atomic(json.dumps({"fault_id": "x", "step": {"nested": 1},
                                            "kind": "spoof", "pid": 7}).encode(),
                                *layout.chaos, "odd")
    assert read_marker(layout, "junk") == {}
    assert read_marker(layout, "odd") == {"fault_id": "x", "pid": 7}


def test_injected_storage_faults_fail_or_delay_the_next_operations(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_module, "RETRY_INITIAL_S", 0.001)
    storage = Storage(str(tmp_path))
    storage.write_atomic(b"data", "f")
    injector = FaultInjector(FaultPlan().fail_reads(0, count=2, step=1)
                             .fail_writes(0, count=1, step=1).faults(1), rank=0, layout=None)
    injector.on_step_end(1)
    assert storage.read_bytes("f") == b"data"  # two EIOs, retried through
    with pytest.raises(OSError, match="injected storage fault: a write failed"):
        storage.write_atomic(b"x", "g")
    storage.write_atomic(b"x", "g")  # only the next one
    INJECTED.arm("read", count=5)
    with pytest.raises(OSError):  # five in a row outlast the five attempts
        storage.read_bytes("f")


def test_save_faults_fire_only_at_a_save_and_step_faults_at_or_after_their_step(layout):
    faults = FaultPlan().fail_writes(0, count=1, step=4).kill_during_save(0, step=4).faults(1)
    injector = FaultInjector(faults, rank=0, layout=layout)
    injector.on_step_end(3)
    assert fired_markers(layout) == []
    injector.on_step_end(6)  # a restart may resume past step 4: the fault still fires
    assert fired_markers(layout) == ["fail_writes-rank0-step4"]
    with pytest.raises(OSError):
        INJECTED.check("write")
    assert [f.kind for f in injector._faults] == ["kill_during_save"]  # waits for a save


def test_a_marker_still_being_written_is_not_a_second_firing(tmp_path):
    # On local disk a marker is written as a temporary file, then renamed: a listing between
    # the two sees the temporary file, complete. It once made a fault fire "twice".
    layout = RunLayout(Storage(str(tmp_path)), "run")
    (fault,) = FaultPlan().delay_reads(rank=0, delay_s=0.3, count=2, step=16).faults(2)
    schedule = ChaosSchedule([fault], layout, started_at=0.0)
    body = json.dumps({"fault_id": fault.id, "rank": 0, "step": 16, "attempt": 3}).encode()
    folder = tmp_path / "run" / "chaos"
    folder.mkdir(parents=True)
    temporary = folder / f"{storage_module.TEMP_PREFIX}0123-{fault.id}"
    temporary.write_bytes(body)
    assert schedule.refresh() == [] and fired_markers(layout) == []
    temporary.rename(folder / fault.id)
    assert [(k, e["fault_id"]) for k, e in schedule.refresh()] == [("fault_fired", fault.id)]
    assert schedule.refresh() == [] and schedule.for_attempt(0.0) == []
