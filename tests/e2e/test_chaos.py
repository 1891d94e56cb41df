"""End to end: faults from the chaos vocabulary, on a real local Ray.

- `orchestrator chaos` run from another process injects into a running `orchestrator run`, as
  a chaos tester would; a request someone else planted in the bucket is refused, never run.
- A plan with one fault of every kind a single node can take fires each exactly once, across
  restarts, and the run ends with the weights of an uninterrupted one.
- `kill_driver`: the driver SIGKILLs itself; the next `orchestrator run` continues the job and
  the fault does not fire again.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from orchestrator.chaos import FaultPlan
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import (ROOT, assert_same_final_state, events_of, make_config, poll_until,
                           run_job, start_driver)

pytestmark = pytest.mark.e2e

ARGS = {"steps": 40, "step_time_s": 0.1}
HANG_TIMEOUT_S = 4.0


def mlp_job(storage, name, plan: FaultPlan | None = None, checkpoint=None):
    return make_config(str(storage), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": ARGS},
                       checkpoint={"interval_steps": 5, **(checkpoint or {})},
                       failure={"max_restarts": 10, "max_user_errors": 3,
                                "hang_timeout_s": HANG_TIMEOUT_S, "failure_grace_s": 0.5,
                                "backoff_initial_s": 0},
                       chaos=(plan or FaultPlan()).config())


@pytest.fixture(scope="module")
def reference(mlp_reference):
    return mlp_reference(ARGS)  # the session's uninterrupted run of this model (conftest.py)


def chaos_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "chaos", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_orchestrator_chaos_injects_into_a_running_job_from_another_process(
        ray_cluster, tmp_path, reference):
    storage = tmp_path / "runs"
    layout = RunLayout(Storage(str(storage)), "live")
    job = start_driver(ray_cluster, storage, "live", ARGS,
                       f"failure.hang_timeout_s={HANG_TIMEOUT_S}", "failure.max_restarts=5")
    try:
        poll_until(lambda: layout.storage.exists(*layout.events) and events_of(
            layout, "checkpoint_committed"), 120, "the first checkpoint")
        # Someone who can write the bucket plants a request: refused, never carried out.
        layout.storage.write_atomic(json.dumps({"fault": {"kind": "kill", "rank": 0,
                                                          "cmd": "rm -rf /"}}).encode(),
                                    *layout.chaos_requests, "cli-planted-kill.json")
        kill = chaos_cli(str(storage / "live"), "kill", "--rank", "1", "--wait",
                         "--wait-timeout-s", "60")
        assert kill.returncode == 0, kill.stderr
        assert "sent kill rank 1 at the first chance" in kill.stdout and "fired" in kill.stdout
        poll_until(lambda: len(events_of(layout, "first_step")) >= 2, 120, "the recovery")
        hang = chaos_cli("live", "--storage", str(storage), "hang", "--rank", "0", "--wait",
                         "--wait-timeout-s", "60")
        assert hang.returncode == 0, hang.stderr
        out, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, out[-3000:]

    (refused,) = events_of(layout, "fault_request_refused")
    assert refused["request"] == "cli-planted-kill.json" and "unknown key" in refused["reason"]
    requested = events_of(layout, "fault_requested")
    assert [(e["fault_kind"], e["rank"]) for e in requested] == [("kill", 1), ("hang", 0)]
    assert all(e["source"].startswith("orchestrator chaos by ") for e in requested)
    fired = events_of(layout, "fault_fired")
    assert [e["fault_id"] for e in fired] == [e["fault_id"] for e in requested]
    assert all(e["source"] == r["source"] for e, r in zip(fired, requested))
    failures = [(e["failure_kind"], e["rank"]) for e in events_of(layout, "failure")]
    assert failures == [("worker_died", 1), ("hang", 0)]
    assert "chaos: cli-" in out and "fired (orchestrator chaos by" in out  # said in the log
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_one_fault_of_every_single_node_kind_fires_once_and_the_run_ends_equal(
        ray_cluster, tmp_path, reference):
    plan = (FaultPlan()
            .preempt_at(rank=1, step=4)
            .fail_collective_at(rank=0, step=8)
            .fail_writes(rank=1, count=1, step=12)  # the next write: step 15's shard
            .delay_reads(rank=0, delay_s=0.3, count=2, step=16)
            .raise_at(rank=1, step=18)
            .kill_during_save(rank=0, step=21)  # in the background writer (async)
            .block_at(rank=1, step=27)
            .hang_at(rank=0, step=31)
            .kill_at(rank=1, step=34)
            .kill_at(rank=0, at_s=1.0)  # a time: at the first chance after it
            .kill_node_at(rank=1, step=36))  # the driver's node: skipped, said so
    result, layout = run_job(mlp_job(tmp_path, "every", plan, {"async_mode": "thread"}))
    assert result.succeeded, result.message

    planned = {f.id for f in plan.faults(2)} - {"kill_node-rank1-step36"}
    fired = collections.Counter(e["fault_id"] for e in events_of(layout, "fault_fired"))
    assert set(fired) == planned and set(fired.values()) == {1}, fired
    (skipped,) = events_of(layout, "fault_skipped")
    assert skipped["fault_id"] == "kill_node-rank1-step36"
    assert "driver's node" in skipped["reason"]
    kinds = collections.Counter(e["failure_kind"] for e in events_of(layout, "failure"))
    assert kinds["preempted"] == 1 and kinds["user_error"] == 1 and kinds["hang"] >= 2
    assert kinds["worker_died"] >= 3  # kill_during_save, the two kills
    assert kinds["communication_error"] >= 1  # fail_collective: no rank is to blame
    # The failed write: step 15's save, not committed then (other saves fail too, as peers
    # die under them), committed by a later attempt.
    (failed_save,) = [e for e in events_of(layout, "checkpoint_failed")
                      if "injected storage fault" in json.dumps(e)]
    assert failed_save["step"] == 15
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["restarts"] == len(events_of(layout, "restart"))
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_kill_driver_ends_the_driver_and_the_next_one_continues_without_refiring(
        ray_cluster, tmp_path, reference):
    storage = tmp_path / "runs"
    layout = RunLayout(Storage(str(storage)), "driver")
    overrides = ("chaos.faults=[{kind: kill_driver, at_step: 12}]", "run.lease_timeout_s=6")
    first = start_driver(ray_cluster, storage, "driver", ARGS, *overrides)
    out1, _ = first.communicate(timeout=300)
    assert first.returncode == -9, out1[-3000:]
    assert "this driver kills itself (SIGKILL)" in out1
    second = start_driver(ray_cluster, storage, "driver", ARGS, *overrides)
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out2[-3000:]

    (fired,) = events_of(layout, "fault_fired")
    assert fired["fault_id"] == "kill_driver-rank0-step12" and fired["step"] >= 12
    (resumed,) = events_of(layout, "driver_resumed")
    assert resumed["committed_by_this_job"]
    assert_same_final_state(layout, reference, ARGS["steps"])
