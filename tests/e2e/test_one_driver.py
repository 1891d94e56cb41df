"""One driver per run, tried from outside as a scheduler would: a second `orchestrator run`
of a live run is refused at once; a driver frozen until its lease expires is taken over, and
its workers can no longer commit; a driver SIGKILLed after its job committed is continued by
the next one, which neither starts the job again nor forgets its failures. On local disk and
on S3 (moto)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.lease import LeaseRecord, current_generation
from tests.helpers import assert_same_final_state, events_of, poll_until, start_driver

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"steps": 40, "step_time_s": 0.25}


def driver(address: str, storage: str, name: str, *overrides: str) -> subprocess.Popen:
    return start_driver(address, storage, name, ARGS, "run.lease_timeout_s=6", *overrides)


def committed(layout: RunLayout) -> list:
    return commit.committed_checkpoints(layout)[0] if layout.storage.exists(
        *layout.checkpoints) else []


@pytest.fixture(scope="module")
def reference(mlp_reference):
    return mlp_reference(ARGS)  # the session's uninterrupted run of this model (conftest.py)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def test_a_second_driver_of_a_live_run_is_refused_at_once_naming_the_holder(
        ray_cluster, storage, reference):
    layout = RunLayout(Storage(storage), "twice")
    first = driver(ray_cluster, storage, "twice")
    try:
        poll_until(lambda: committed(layout), 120, "the first checkpoint")
        t0 = time.monotonic()
        second = driver(ray_cluster, storage, "twice")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2, out
        assert time.monotonic() - t0 < 10
        assert f"held by another driver (pid {first.pid} on " in out, out
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out[-3000:]
    finally:
        first.kill()
    assert len(events_of(layout, "job_start")) == 1  # the second wrote nothing
    assert_same_final_state(layout, reference, ARGS["steps"])
    record = LeaseRecord.from_json(layout.storage.read_bytes(*layout.lease(1)))
    assert record.released and record.holder.pid == first.pid


def test_a_frozen_driver_is_taken_over_once_its_lease_expires_and_can_never_commit_again(
        ray_cluster, tmp_path, reference):
    storage = str(tmp_path / "runs")
    layout = RunLayout(Storage(storage), "frozen")
    first = driver(ray_cluster, storage, "frozen")
    try:
        poll_until(lambda: committed(layout), 120, "the first checkpoint")
        first.send_signal(signal.SIGSTOP)  # alive, holding its lease, not renewing it
        record = LeaseRecord.from_json(layout.storage.read_bytes(*layout.lease(1)))
        refused = driver(ray_cluster, storage, "frozen")
        assert refused.wait(timeout=60) == 2  # not yet expired, and its holder is alive
        poll_until(lambda: time.time() > record.expires_at + 0.5, 30, "the lease to expire")
        took_over_at = time.time()
        second = driver(ray_cluster, storage, "frozen")
        poll_until(lambda: current_generation(layout) == 2, 60, "the takeover")
        first.send_signal(signal.SIGCONT)  # it wakes up, with workers that kept training
        out2, _ = second.communicate(timeout=300)
        out1, _ = first.communicate(timeout=120)
    finally:
        for p in (first,):
            p.send_signal(signal.SIGCONT)
            p.kill()
    assert second.returncode == 0, out2[-3000:]
    assert first.returncode == 1 and "was taken over" in out1, out1[-3000:]
    (taken,) = events_of(layout, "lease_taken_over")
    assert taken["generation"] == 2 and taken["previous_expired"]
    # Every checkpoint whose manifest was made after the takeover (the fence is checked
    # after the manifest is made) was committed under generation 2.
    (start2,) = [e for e in events_of(layout, "job_start") if e["lease_generation"] == 2]
    assert start2["time"] > took_over_at
    for c in committed(layout):
        if c.manifest.created_at > start2["time"]:
            assert c.manifest.fencing_token == 2, (c.step, c.manifest.fencing_token)
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_a_restarted_driver_continues_the_job_without_starting_it_over(
        ray_cluster, tmp_path, reference):
    storage = str(tmp_path / "runs")
    layout = RunLayout(Storage(storage), "cont")
    # A finished run with checkpoints 5..40 (its steps need not sleep: nothing watches
    # them); then a job that starts over from step 20.
    first = driver(ray_cluster, storage, "cont", "workload.args.step_time_s=0")
    assert first.wait(timeout=300) == 0
    start_over = ("checkpoint.restore=20", "checkpoint.overwrite=true",
                  "chaos.faults=[{kind: kill, rank: 1, at_step: 23}]", "failure.max_restarts=1")
    job = driver(ray_cluster, storage, "cont", *start_over)
    try:
        # SIGKILL the driver once its job committed a checkpoint of its own (after 25).
        poll_until(lambda: len(events_of(layout, "job_start")) == 2, 120, "the job's start")
        started = events_of(layout, "job_start")[-1]["time"]
        poll_until(lambda: any(e["step"] >= 30 for e in events_of(layout, "checkpoint_committed")
                               if e["time"] > started), 180, "the job's own checkpoint")
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        job.kill()
    latest = committed(layout)[0].step
    before = {c.step for c in committed(layout)}
    again = driver(ray_cluster, storage, "cont", *start_over)  # the scheduler restarts it
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    (resumed,) = events_of(layout, "driver_resumed")
    assert resumed["committed_by_this_job"] and resumed["failures_so_far"] == 1
    starts = events_of(layout, "job_start")
    assert starts[-1]["job_id"] == starts[-2]["job_id"] != starts[0]["job_id"]
    # Continued from the latest checkpoint, not from step 20 again; nothing deleted.
    assert events_of(layout, "checkpoint_restored")[-1]["step"] == latest
    assert before <= {c.step for c in committed(layout)}
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert [f["failure_kind"] for f in summary["failures"]] == ["worker_died"]
    assert_same_final_state(layout, reference, ARGS["steps"])
