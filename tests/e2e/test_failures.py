"""End to end: errors in user code, the restart budget, and the job's verdict."""

from __future__ import annotations

import json

import pytest

from tests.helpers import events_of, make_config, run_job

pytestmark = pytest.mark.e2e


def mlp_job(tmp_path, name: str, args: dict, max_restarts: int = 3, **sections):
    return make_config(str(tmp_path), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": args},
                       scaling={"num_workers": 2}, checkpoint={"interval_steps": 4},
                       failure={"max_restarts": max_restarts, "failure_grace_s": 0.5},
                       **sections)


def test_user_error_on_first_attempt_restarts_and_completes(ray_cluster, tmp_path):
    args = {"steps": 12, "raise_at_step": 6, "raise_on_attempts": [0]}
    result, layout = run_job(mlp_job(tmp_path, "bug-once", args))

    assert result.succeeded, result.message
    # The bug is in every rank's code: one incident, one failure event per rank, grouped in
    # the decision's one-line description.
    failures = events_of(layout, "failure")
    assert sorted(f["rank"] for f in failures) == [0, 1]
    for failure in failures:
        assert failure["failure_kind"] == "user_error" and failure["step"] == 5
        assert "RuntimeError: injected bug at step 6" in failure["message"]
        assert "Traceback (most recent call last)" in failure["traceback"]
        assert "workloads/mlp.py" in failure["traceback"]
    (decision,) = events_of(layout, "decision")
    assert decision["reason"].startswith("ranks 0,1: user_error: RuntimeError: injected bug")
    assert [e["from_step"] for e in events_of(layout, "restart")] == [4]
    assert result.summary["steps_completed"] == 12


def test_user_error_on_one_rank_is_blamed_on_that_rank(ray_cluster, tmp_path):
    """Rank 1 raises while rank 0 blocks in the next collective: the driver must not wait for
    rank 0 (it would wait for the collective timeout) and must blame rank 1 alone."""
    args = {"steps": 10, "raise_at_step": 5, "raise_on_ranks": [1], "raise_on_attempts": [0]}
    result, layout = run_job(mlp_job(tmp_path, "bug-rank1", args))

    assert result.succeeded, result.message
    (failure,) = events_of(layout, "failure")
    assert (failure["failure_kind"], failure["rank"], failure["step"]) == ("user_error", 1, 4)
    assert "injected bug at step 5" in failure["message"]


def test_max_restarts_exceeded_fails_with_the_failures_listed(ray_cluster, tmp_path):
    args = {"steps": 12, "raise_at_step": 6}  # a deterministic bug: every attempt
    result, layout = run_job(mlp_job(tmp_path, "bug-always", args, max_restarts=1))

    assert not result.succeeded
    assert "failure.max_restarts=1" in result.message
    assert result.message.count("RuntimeError: injected bug at step 6") >= 2
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["status"] == "failed"
    assert summary["restarts"] == 1
    assert {f["attempt"] for f in summary["failures"]} == {0, 1}
    assert all("injected bug" in f["message"] for f in summary["failures"])
    assert events_of(layout, "job_end")[-1]["status"] == "failed"
