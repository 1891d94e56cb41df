"""Triage is a pure function from what the worker group saw to what failed: no Ray, no
processes, no clock."""

from orchestrator.failures import FailureKind, describe
from orchestrator.hangs import Activity, Hang
from orchestrator.triage import (Ending, RankResult, classify, hung_result, is_peer_echo,
                                 preemptions, something_failed, suspects, triage)


def died(rank, step=7, node_died=False):
    return RankResult(rank=rank, step=step, ending=Ending.NODE_DIED if node_died else Ending.DIED,
                      message="actor died")


def raised(rank, message="RuntimeError: boom", step=7, error_type="RuntimeError"):
    return RankResult(rank=rank, step=step, ending=Ending.RAISED, message=message,
                      traceback="tb", error_type=error_type)


def finished(rank, step=20):
    return RankResult(rank=rank, step=step, ending=Ending.FINISHED)


ECHO = "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:4242"


def hang(rank, stalled_s=31.0):
    return Hang(rank=rank, doing=Activity.STEP, stalled_s=stalled_s, timeout_s=30.0,
                why="5 x the slowest step (6.0s)")


# --- how a rank ended ---------------------------------------------------------------------

def test_only_finished_and_clean_stops_are_ok_and_only_losses_are_gone():
    assert {e for e in Ending if e.ok} == {Ending.FINISHED, Ending.STOPPED, Ending.NOTICED}
    assert {e for e in Ending if e.gone} == {Ending.DIED, Ending.NODE_DIED, Ending.HUNG}


def test_something_failed_when_a_rank_failed_or_hung_not_when_ranks_stopped_cleanly():
    stopped = RankResult(rank=0, step=9, ending=Ending.STOPPED, message="resize")
    assert not something_failed({0: stopped, 1: finished(1)}, [])
    assert something_failed({0: stopped}, [hang(1)])
    assert something_failed({0: raised(0)}, [])
    assert not something_failed({}, [])


def test_an_echo_is_a_raised_connection_error_but_not_a_storage_one_nor_a_death():
    assert is_peer_echo(raised(0, ECHO))
    assert not is_peer_echo(raised(0, ECHO, error_type="StorageFailure"))
    assert not is_peer_echo(RankResult(rank=0, step=3, ending=Ending.DIED, message=ECHO))
    assert not is_peer_echo(raised(0, "ValueError: bad shape"))


# --- whom to probe --------------------------------------------------------------------------

def test_ranks_that_did_not_report_are_suspects_only_when_every_failure_is_an_echo():
    assert suspects({0: raised(0, ECHO)}, {0, 1, 2}) == {1, 2}
    assert suspects({0: raised(0, ECHO), 1: raised(1, "ValueError: x")}, {0, 1, 2}) == set()
    assert suspects({0: raised(0, ECHO), 1: died(1)}, {0, 1, 2}) == set()
    assert suspects({0: raised(0, ECHO), 1: raised(1, ECHO)}, {0, 1}) == set()  # nobody left
    assert suspects({0: finished(0)}, {0, 1}) == set()  # nothing failed


# --- the whole path --------------------------------------------------------------------------

def test_a_hung_rank_is_the_cause_even_though_its_kill_reports_a_death():
    # The driver killed rank 1 for its hang; Ray then reported it dead, its peer echoed.
    results = {0: raised(0, ECHO, step=14), 1: died(1, step=-1)}
    (failure,) = triage(results, [hang(1)], last_steps={0: 14, 1: 14}, attempt=3)
    assert (failure.kind, failure.rank, failure.step, failure.attempt) == (
        FailureKind.HANG, 1, 14, 3)
    assert "no progress for 31s in a step (timeout 30s" in failure.message


def test_a_hung_rank_that_never_reported_gets_a_result_of_its_own():
    result = hung_result(hang(2), None)
    assert (result.rank, result.ending, result.step) == (2, Ending.HUNG, -1)


def test_a_dead_rank_dies_at_the_furthest_step_the_gang_is_known_to_have_reached():
    results = {0: raised(0, ECHO, step=11), 1: died(1, step=-1)}
    (failure,) = triage(results, [], last_steps={0: 11, 1: 12}, attempt=0)
    assert (failure.kind, failure.rank, failure.step) == (FailureKind.WORKER_DIED, 1, 12)


def test_no_failures_when_nothing_failed():
    assert triage({0: finished(0), 1: finished(1)}, [], {0: 20, 1: 20}, attempt=0) == []


def test_ranks_that_stopped_after_their_own_notice_are_preemptions_the_others_are_not():
    results = {0: RankResult(rank=0, step=13, ending=Ending.STOPPED, message="SIGTERM to peer"),
               1: RankResult(rank=1, step=13, ending=Ending.NOTICED, node_id="n1",
                             message="preemption notice: SIGTERM")}
    (failure,) = preemptions(results, attempt=1)
    assert (failure.kind, failure.rank, failure.step, failure.node_id, failure.message) == (
        FailureKind.PREEMPTED, 1, 13, "n1", "preemption notice: SIGTERM")


# --- classification ---------------------------------------------------------------------------

def test_a_dead_rank_is_the_root_cause_and_peer_errors_are_echoes():
    failures = classify([raised(0, "RuntimeError: Connection closed by peer"), died(1)], attempt=0)
    assert [(f.kind, f.rank) for f in failures] == [(FailureKind.WORKER_DIED, 1)]


def test_a_rank_on_a_dead_node_is_a_node_failure():
    failures = classify([died(2, node_died=True)], attempt=0)
    assert failures[0].kind is FailureKind.NODE_DIED and failures[0].kind.is_infrastructure


def test_a_hung_rank_wins_over_its_peers_echo_errors():
    hung = RankResult(rank=1, step=-1, ending=Ending.HUNG, message="no progress for 5s")
    failures = classify([hung, raised(0, "RuntimeError: [gloo] Connection reset by peer")], 0)
    assert [(f.kind, f.rank) for f in failures] == [(FailureKind.HANG, 1)]


def test_a_workload_error_wins_over_peer_echoes_without_any_death():
    failures = classify([raised(0, "RuntimeError: Connection closed by peer"),
                         raised(1, "ValueError: bad shape")], attempt=0)
    assert [(f.kind, f.rank) for f in failures] == [(FailureKind.USER_ERROR, 1)]


def test_user_errors_are_reported_per_rank_with_their_traceback():
    failures = classify([raised(1), RankResult(rank=0, step=7, ending=Ending.FINISHED)], attempt=2)
    assert [(f.kind, f.rank, f.attempt, f.traceback) for f in failures] == [
        (FailureKind.USER_ERROR, 1, 2, "tb")]


def test_no_failure_when_every_rank_succeeded():
    assert classify([RankResult(rank=0, step=9, ending=Ending.FINISHED)], attempt=0) == []


def test_identical_errors_of_several_ranks_are_grouped():
    failures = classify([raised(0), raised(1), raised(3, "ValueError: other")], attempt=0)
    assert describe(failures) == (
        "ranks 0,1: user_error: RuntimeError: boom; rank 3: user_error: ValueError: other")


def test_echoes_alone_are_a_communication_failure_not_the_users_fault():
    failures = classify([raised(0, "RuntimeError: [gloo] Connection reset by peer")], attempt=0)
    assert failures[0].kind is FailureKind.COMMUNICATION and failures[0].kind.is_infrastructure


