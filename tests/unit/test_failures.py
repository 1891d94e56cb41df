"""The failure classification and policy are pure functions: no Ray, no processes."""

from orchestrator.config import FailureConfig
from orchestrator.failures import Action, FailureKind, RankResult, classify, decide, describe


def died(rank, step=7):
    return RankResult(rank=rank, step=step, ok=False, died=True, message="actor died")


def raised(rank, message="RuntimeError: boom", step=7):
    return RankResult(rank=rank, step=step, ok=False, message=message, traceback="tb")


def test_a_dead_rank_is_the_root_cause_and_peer_errors_are_echoes():
    failures = classify([raised(0, "RuntimeError: Connection closed by peer"), died(1)], attempt=0)
    assert [(f.kind, f.rank) for f in failures] == [(FailureKind.WORKER_DIED, 1)]


def test_user_errors_are_reported_per_rank_with_their_traceback():
    failures = classify([raised(1), RankResult(rank=0, step=7, ok=True)], attempt=2)
    assert [(f.kind, f.rank, f.attempt, f.traceback) for f in failures] == [
        (FailureKind.USER_ERROR, 1, 2, "tb")]


def test_no_failure_when_every_rank_succeeded():
    assert classify([RankResult(rank=0, step=9, ok=True)], attempt=0) == []


def test_identical_errors_of_several_ranks_are_grouped():
    failures = classify([raised(0), raised(1), raised(3, "ValueError: other")], attempt=0)
    assert describe(failures) == (
        "ranks 0,1: user_error: RuntimeError: boom; rank 3: user_error: ValueError: other")


def test_restarts_until_max_restarts_then_stop_naming_the_setting():
    config = FailureConfig(max_restarts=2)
    incidents = []
    actions = []
    for attempt in range(3):
        incidents.append(classify([died(1)], attempt))
        actions.append(decide(incidents, config))
    assert [d.action for d in actions] == [Action.RESTART, Action.RESTART, Action.STOP]
    assert "restart 1 of 2 allowed" in actions[0].reason
    assert "failure.max_restarts=2" in actions[2].reason


def test_zero_restarts_stops_at_the_first_failure():
    decision = decide([classify([died(0)], 0)], FailureConfig(max_restarts=0))
    assert decision.action is Action.STOP
