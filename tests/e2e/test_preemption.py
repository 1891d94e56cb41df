"""End to end: preemption notices (SIGTERM to a worker) and elastic resume at a smaller world
size, growing back when resources return."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray

from orchestrator.checkpoint.commit import committed_checkpoints, read_manifest
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import (assert_same_final_state, events_of, make_config, poll_until,
                           run_job)

pytestmark = pytest.mark.e2e

ARGS = {"steps": 40, "step_time_s": 0.05, "batch_size": 12}  # divisible by 2 and 3


def mlp_job(tmp_path, name, num_workers=2, args=ARGS, **sections):
    return make_config(str(tmp_path), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": args},
                       scaling={"num_workers": num_workers, **sections.pop("scaling", {})},
                       checkpoint={"interval_steps": 10}, **sections)


def run_in_thread(config):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(zip(("result", "layout"),
                                                                run_job(config))))
    thread.start()
    layout = RunLayout(Storage(config.run.storage_url), config.run.name)
    return thread, outcome, layout


def events(layout, kind):
    return events_of(layout, kind) if layout.storage.exists(*layout.events) else []


@pytest.fixture(scope="module")
def reference(mlp_reference):
    return mlp_reference(ARGS)  # the session's uninterrupted run of this model (conftest.py)


def test_sigterm_checkpoints_at_once_and_loses_at_most_the_step_in_progress(
        ray_cluster, tmp_path, reference):
    thread, outcome, layout = run_in_thread(mlp_job(tmp_path, "sigterm"))
    poll_until(lambda: any(e["step"] >= 10 for e in events(layout, "checkpoint_committed")),
               120, "the first checkpoint")
    pid = events(layout, "workers_started")[0]["workers"][1]["pid"]
    os.kill(pid, signal.SIGTERM)  # what a cloud sends a spot VM's processes before it goes
    thread.join(timeout=300)
    result = outcome["result"]

    assert result.succeeded, result.message
    (failure,) = events(layout, "failure")
    assert (failure["failure_kind"], failure["rank"]) == ("preempted", 1)
    assert "SIGTERM" in failure["message"]
    (restart,) = events(layout, "restart")
    assert restart["replaced_ranks"] == [1]
    # The save came at once, off the 10-step interval, and the restart resumed from it.
    assert restart["from_step"] % 10 != 0
    assert restart["from_step"] in [e["step"] for e in events(layout, "checkpoint_committed")]
    assert result.summary["lost_steps"] <= 1
    assert_same_final_state(layout, reference, ARGS["steps"])


ELASTIC_ARGS = {**ARGS, "steps": 100}  # long enough to grow back well before the end


@pytest.fixture(scope="module")
def elastic_reference(ray_cluster, tmp_path_factory):
    result, layout = run_job(mlp_job(tmp_path_factory.mktemp("eref"), "eref", args=ELASTIC_ARGS))
    assert result.succeeded
    return layout


def test_elastic_resume_at_fewer_workers_then_grow_back(ray_cluster, tmp_path,
                                                       elastic_reference):
    """4 CPUs, 3 workers wanted, a blocker holds 2: the job starts with 2 (min_workers=2),
    grows to 3 at the checkpoint after the blocker leaves, and its losses stay those of a run
    at a fixed world size (the global batch is split, not resized)."""
    blocker = ray.remote(num_cpus=2)(type("Blocker", (), {"ping": lambda self: 1})).remote()
    ray.get(blocker.ping.remote())
    config = mlp_job(tmp_path, "elastic", num_workers=3, args=ELASTIC_ARGS,
                     scaling={"min_workers": 2, "placement_timeout_s": 2})
    thread, outcome, layout = run_in_thread(config)
    try:
        poll_until(lambda: any(e["step"] >= 10 for e in events(layout, "checkpoint_committed")),
                   120, "the first checkpoint")
        assert events(layout, "elastic_world_size")[0]["world_size"] == 2
    finally:
        ray.kill(blocker)
    thread.join(timeout=300)
    result = outcome["result"]

    assert result.succeeded, result.message
    assert len(events(layout, "resize")) == 1 and len(events(layout, "grow_requested")) == 1
    assert events(layout, "failure") == []
    world_sizes = {read_manifest(layout, c.step).world_size for c in committed_checkpoints(layout)[0]}
    assert world_sizes == {2, 3}
    restored = events(layout, "checkpoint_restored")[-1]
    assert (restored["saved_world_size"], restored["world_size"]) == (2, 3)
    # The loss logged at each checkpoint equals the fixed-size run's within 1e-5.
    ours = {c.step: c.manifest.metrics["loss"] for c in committed_checkpoints(layout)[0]}
    ref = {c.step: c.manifest.metrics["loss"]
           for c in committed_checkpoints(elastic_reference)[0]}
    assert ours.keys() == ref.keys()
    for step in ours:
        assert abs(ours[step] - ref[step]) <= 1e-5, (step, ours[step], ref[step])
