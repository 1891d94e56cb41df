"""End to end: the checkpoint volume fills up under a running job, from outside it.

The run's `checkpoints/` folder is a small tmpfs of its own (the rest of the run, its event
log and lease, on the ordinary disk, as a separate checkpoint volume would be). The test
fills it once the job has committed, as another tenant of the volume would: a real ENOSPC
for the next save. With `on_save_error: continue` the job trains on until
`max_failed_saves` saves in a row failed, then stops naming that setting; with `stop` each
failed save is a `storage_error` restart, and once the disk is freed the run completes with
the state of an uninterrupted run.
"""

from __future__ import annotations

import os
import threading

import pytest

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import assert_same_final_state, events_of, make_config, poll_until, run_job
from tests.integration.ckpt_scenarios import fill_disk

pytestmark = pytest.mark.e2e

ARGS = {"steps": 16, "step_time_s": 0.25}


def job(tmp_path, name, **checkpoint):
    return make_config(str(tmp_path), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": ARGS},
                       scaling={"num_workers": 2},
                       checkpoint={"interval_steps": 4, **checkpoint},
                       failure={"failure_grace_s": 0.5, "max_storage_errors": 6})


def start(config):
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        zip(("result", "layout"), run_job(config))))
    thread.start()
    layout = RunLayout(Storage(config.run.storage_url), config.run.name)
    return thread, outcome, layout


def events(layout, kind):
    return events_of(layout, kind) if layout.storage.exists(*layout.events) else []


def test_a_full_volume_fails_saves_until_max_failed_saves_stops_the_job(
        ray_cluster, tmp_path, mount_small_disk):
    config = job(tmp_path, "full", max_failed_saves=2)
    volume = mount_small_disk(tmp_path / "full" / "checkpoints")
    thread, outcome, layout = start(config)
    first = poll_until(lambda: events(layout, "checkpoint_committed"), 120, "a first commit")
    filler = fill_disk(volume)
    before = {c.step for c in commit.committed_checkpoints(layout)[0]}
    thread.join(timeout=240)
    assert not thread.is_alive()
    os.remove(filler)

    result = outcome["result"]
    assert not result.succeeded
    assert "saves in a row failed (checkpoint.max_failed_saves=2)" in result.message
    failed = [e for e in events(layout, "checkpoint_failed")
              if e.get("failure_kind") == "storage_error"]
    assert len(failed) >= 2 and all("No space left" in " ".join(e["errors"]) for e in failed)
    assert [e["then"] for e in failed][-1] == "stop"
    # Nothing was committed for the failed steps, nothing committed before was touched,
    # and no partial save is left behind.
    committed = {c.step for c in commit.committed_checkpoints(layout)[0]}
    assert committed == before and first[0]["step"] in committed
    assert set(layout.step_dirs()) == committed
    for step in committed:
        manifest = commit.read_manifest(layout, step)
        found = commit.verify_files(layout, manifest, sorted(manifest.files))
        assert not found.mismatched and not found.unreadable
    (end,) = events(layout, "job_end")
    assert end["status"] == "failed"


def test_with_on_save_error_stop_a_full_volume_restarts_and_the_run_completes_once_freed(
        ray_cluster, tmp_path, mount_small_disk, mlp_reference):
    ref_layout = mlp_reference(ARGS)

    config = job(tmp_path, "stop", on_save_error="stop")
    volume = mount_small_disk(tmp_path / "stop" / "checkpoints")
    thread, outcome, layout = start(config)
    poll_until(lambda: events(layout, "checkpoint_committed"), 120, "a first commit")
    filler = fill_disk(volume)
    try:
        poll_until(lambda: [f for f in events(layout, "failure")
                            if f["failure_kind"] == "storage_error"], 120,
                   "a storage_error failure")
    finally:
        os.remove(filler)  # the volume has room again
    thread.join(timeout=300)
    assert not thread.is_alive()

    result = outcome["result"]
    assert result.succeeded, result.message
    failures = events(layout, "failure")
    assert failures and {f["failure_kind"] for f in failures} == {"storage_error"}
    assert all("checkpoint.on_save_error=stop" in f["message"] for f in failures)
    decision = events(layout, "decision")[0]
    assert "(failure.max_storage_errors)" in decision["reason"]
    assert_same_final_state(ref_layout, layout, 16)
