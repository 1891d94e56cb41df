"""End to end: hung workers are found by their lack of progress, killed, and the job recovers."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from orchestrator.chaos import FaultPlan
from orchestrator.config import FailureConfig
from tests.helpers import (assert_same_final_state, events_of, make_config, poll_until,
                           run_job)

pytestmark = pytest.mark.e2e

HANG_TIMEOUT_S = 3.0
ARGS = {"steps": 40, "step_time_s": 0.05}


def mlp_job(tmp_path, name, args, hang_timeout_s=HANG_TIMEOUT_S, **sections):
    return make_config(str(tmp_path), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": args},
                       scaling={"num_workers": 2}, checkpoint={"interval_steps": 5},
                       failure={"hang_timeout_s": hang_timeout_s, "failure_grace_s": 0.5},
                       **sections)


@pytest.fixture(scope="module")
def reference(mlp_reference):
    return mlp_reference(ARGS)  # the session's uninterrupted run of this model (conftest.py)


@pytest.mark.parametrize("hang_timeout_s", [HANG_TIMEOUT_S, "auto"])
def test_a_sigstopped_worker_is_detected_within_the_timeout_and_the_run_completes(
        ray_cluster, tmp_path, reference, hang_timeout_s):
    """With `auto` (the default, nothing tuned) the steps of 0.05 s and the saves are timed by
    the run, and the stop is caught after hang_min_s (10 s) -- not the 300 s that the start of
    an attempt or an untimed save allows."""
    config = mlp_job(tmp_path, "sigstop", ARGS, hang_timeout_s=hang_timeout_s)
    timeout_s = HANG_TIMEOUT_S if hang_timeout_s != "auto" else FailureConfig().hang_min_s
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(zip(("result", "layout"),
                                                                run_job(config))))
    driver.start()
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage

    layout = RunLayout(Storage(str(tmp_path)), "sigstop")
    events = lambda kind: events_of(layout, kind) if layout.storage.exists(*layout.events) else []
    poll_until(lambda: any(e["step"] >= 10 for e in events("checkpoint_committed")), 120,
               "the first checkpoints")
    pid = events("workers_started")[0]["workers"][1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        driver.join(timeout=300)
        (hang,) = events("hang_detected")
        assert hang["ranks"] == [1]
        assert hang["time"] - stopped_at <= timeout_s + 2.0
        (why,) = hang["hangs"]
        assert why["rank"] == 1 and why["timeout_s"] == timeout_s
        assert why["doing"] in ("step", "save")
        # The stopped process was killed, not left behind.
        poll_until(lambda: not psutil.pid_exists(pid)
                   or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30, "the kill")
    finally:
        if psutil.pid_exists(pid):  # only ever our own worker
            os.kill(pid, signal.SIGKILL)
    result = outcome["result"]
    assert result.succeeded, result.message
    (failure,) = events("failure")
    assert (failure["failure_kind"], failure["rank"]) == ("hang", 1)
    assert events("restart")[0]["replaced_ranks"] == [1]
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_a_blocked_collective_is_a_hang_and_the_run_completes(ray_cluster, tmp_path, reference):
    """Rank 1 blocks forever at step 12 of the first attempt; rank 0 waits for it in the next
    collective. Both still answer polls, so both are hung: both are replaced."""
    plan = FaultPlan().block_at(rank=1, step=12)
    result, layout = run_job(mlp_job(tmp_path, "blocked", ARGS, chaos=plan.config()))
    assert result.succeeded, result.message
    assert {(f["failure_kind"], f["rank"]) for f in events_of(layout, "failure")} == {
        ("hang", 0), ("hang", 1)}
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10]
    assert_same_final_state(layout, reference, ARGS["steps"])
