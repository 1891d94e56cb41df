"""End to end: errors in user code, the restart budget, and the job's verdict."""

from __future__ import annotations

import json

import pytest

from orchestrator.chaos import FaultPlan
from tests.helpers import assert_same_final_state, events_of, make_config, run_job

pytestmark = pytest.mark.e2e


def mlp_job(tmp_path, name: str, args: dict, max_restarts: int = 3, failure=None,
            scaling=None, **sections):
    return make_config(str(tmp_path), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": args},
                       scaling=scaling or {"num_workers": 2}, checkpoint={"interval_steps": 4},
                       failure={"max_restarts": max_restarts, "failure_grace_s": 0.5,
                                **(failure or {})},
                       **sections)


def test_user_error_on_first_attempt_restarts_and_completes(ray_cluster, tmp_path):
    plan = FaultPlan().raise_at(rank=0, step=6).raise_at(rank=1, step=6)
    result, layout = run_job(mlp_job(tmp_path, "bug-once", {"steps": 12}, chaos=plan.config()))

    assert result.succeeded, result.message
    # The bug is in every rank's code: one incident, one failure event per rank, grouped in
    # the decision's one-line description.
    failures = events_of(layout, "failure")
    assert sorted(f["rank"] for f in failures) == [0, 1]
    for failure in failures:
        assert failure["failure_kind"] == "user_error" and failure["step"] == 6
        assert "InjectedFault: injected fault: raise at step 6 (config)" in failure["message"]
        assert "Traceback (most recent call last)" in failure["traceback"]
        assert "workloads/mlp.py" in failure["traceback"]
    (decision,) = events_of(layout, "decision")
    assert decision["reason"].startswith("ranks 0,1: user_error: InjectedFault: injected fault")
    fired = events_of(layout, "fault_fired")
    assert sorted((f["fault_id"], f["source"], f["rank"], f["step"]) for f in fired) == [
        ("raise-rank0-step6", "config", 0, 6), ("raise-rank1-step6", "config", 1, 6)]
    assert [e["from_step"] for e in events_of(layout, "restart")] == [4]
    assert result.summary["steps_completed"] == 12


def test_user_error_on_one_rank_is_blamed_on_that_rank(ray_cluster, tmp_path):
    """Rank 1 raises while rank 0 blocks in the next collective: the driver must not wait for
    rank 0 (it would wait for the collective timeout) and must blame rank 1 alone."""
    plan = FaultPlan().raise_at(rank=1, step=5)
    result, layout = run_job(mlp_job(tmp_path, "bug-rank1", {"steps": 10}, chaos=plan.config()))

    assert result.succeeded, result.message
    (failure,) = events_of(layout, "failure")
    assert (failure["failure_kind"], failure["rank"], failure["step"]) == ("user_error", 1, 5)
    assert "injected fault: raise at step 5" in failure["message"]


def test_max_restarts_exceeded_fails_with_the_failures_listed(ray_cluster, tmp_path):
    plan = FaultPlan().kill_at(rank=1, step=3).kill_at(rank=0, step=6).kill_at(rank=1, step=9)
    config = mlp_job(tmp_path, "kills", {"steps": 12}, max_restarts=2, chaos=plan.config())
    result, layout = run_job(config)

    assert not result.succeeded
    assert "infrastructure failure 3 exceeds failure.max_restarts=2" in result.message
    for attempt, rank in enumerate([1, 0, 1]):
        assert f"attempt {attempt}: rank {rank}: worker_died" in result.message
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["status"] == "failed" and summary["restarts"] == 2
    assert [(f["attempt"], f["rank"], f["failure_kind"]) for f in summary["failures"]] == [
        (0, 1, "worker_died"), (1, 0, "worker_died"), (2, 1, "worker_died")]
    assert events_of(layout, "job_end")[-1]["status"] == "failed"


def test_a_deterministic_bug_stops_after_crash_loop_limit_attempts(ray_cluster, tmp_path):
    plan = FaultPlan().raise_at(rank=0, step=6, repeat=True)
    config = mlp_job(tmp_path, "bug-always", {"steps": 12}, chaos=plan.config(),
                     max_restarts=10, failure={"crash_loop_limit": 2, "max_user_errors": 10})
    result, layout = run_job(config)

    assert not result.succeeded
    assert "crash loop (failure.crash_loop_limit=2)" in result.message
    assert "InjectedFault: injected fault: raise at step 6" in result.message
    assert len(events_of(layout, "restart")) == 1  # 2 attempts, no third
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert {f["attempt"] for f in summary["failures"]} == {0, 1}


def test_an_intermittent_bug_is_restarted_through(ray_cluster, tmp_path):
    """The same bug on two attempts, below crash_loop_limit=3, then gone: the job completes."""
    plan = FaultPlan().raise_at(rank=1, step=6).raise_at(rank=1, step=6)
    result, layout = run_job(mlp_job(tmp_path, "bug-twice", {"steps": 12}, chaos=plan.config(),
                                     failure={"crash_loop_limit": 3, "backoff_initial_s": 0.1}))
    assert result.succeeded, result.message
    assert len(events_of(layout, "restart")) == 2
    reference, ref_layout = run_job(mlp_job(tmp_path, "no-bug", {"steps": 12}))
    assert reference.succeeded
    assert_same_final_state(layout, ref_layout, 12)


def test_survivors_are_reused_and_a_spare_takes_the_lost_rank_many_times_in_a_row(
        ray_cluster, tmp_path, mlp_reference):
    """Six kills in a row: each time the survivor's process group is re-formed in the same
    process, and the lost rank goes to the spare (warm, or still starting after the previous
    kill used the last one)."""
    plan = FaultPlan()
    for step in (20, 23, 26, 29, 32, 35):
        plan.kill_at(rank=1, step=step)
    config = mlp_job(tmp_path, "chain", {"steps": 40, "step_time_s": 0.1}, max_restarts=6,
                     failure={"backoff_initial_s": 0}, chaos=plan.config(),
                     scaling={"num_workers": 2, "spare_workers": 1,
                              "resources_per_worker": {"CPU": 0.5}})
    result, layout = run_job(config)
    assert result.succeeded, result.message
    started = events_of(layout, "workers_started")
    assert len(started) == 7
    assert len({s["workers"][0]["pid"] for s in started}) == 1  # rank 0 kept its process
    assert all(s["ranks_from_spares"] == [1] for s in started[1:])
    assert_same_final_state(layout, mlp_reference({"steps": 40}), 40)


def test_without_spares_a_standby_holding_no_resources_takes_the_lost_rank(
        ray_cluster, tmp_path, mlp_reference):
    """The default (scaling.standby_workers: 1, no spare): the gang takes every CPU of the
    cluster, so nothing could hold a spare's resources -- yet each lost rank goes to the idle
    standby on its node, which already imported torch, instead of a new process."""
    import ray

    plan = FaultPlan().kill_at(rank=1, step=30).kill_at(rank=1, step=60)
    cpus = ray.cluster_resources()["CPU"]
    config = mlp_job(tmp_path, "standby", {"steps": 90, "step_time_s": 0.1}, max_restarts=2,
                     failure={"backoff_initial_s": 0}, chaos=plan.config(),
                     scaling={"num_workers": 2, "resources_per_worker": {"CPU": cpus / 2}})
    assert config.scaling.standby_workers == 1 and config.scaling.spare_workers == 0
    result, layout = run_job(config)
    assert result.succeeded, result.message
    first, *restarted = events_of(layout, "workers_started")
    assert len(restarted) == 2
    assert [s["ranks_from_standbys"] for s in restarted] == [[1], [1]]
    assert all(s["ranks_from_spares"] == [] for s in restarted)
    # A standby is a process of its own, not a survivor reused.
    pids = [first["workers"][1]["pid"]] + [s["workers"][1]["pid"] for s in restarted]
    assert len(set(pids)) == 3
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert_same_final_state(layout, mlp_reference({"steps": 90}), 90)
