"""The failure policy is a pure function: no Ray, no processes. (How failures are found
among the ranks' results is tests/unit/test_triage.py.)"""

from orchestrator.config import FailureConfig
from orchestrator.failures import Action, FailureKind, Incident, backoff_s, decide
from orchestrator.triage import classify
from tests.unit.test_triage import died, raised


def incident(results, attempt=0, progress_s=0.0):
    return Incident(attempt=attempt, failures=tuple(classify(results, attempt)),
                    progress_s=progress_s)


# --- budgets -----------------------------------------------------------------------------------

def test_infrastructure_restarts_until_max_restarts_then_stop_naming_the_setting():
    config = FailureConfig(max_restarts=2)
    history, actions = [], []
    for attempt in range(3):
        history.append(incident([died(1)], attempt))
        actions.append(decide(history, config))
    assert [d.action for d in actions] == [Action.RESTART, Action.RESTART, Action.STOP]
    assert "infrastructure failure 1 of 2 allowed" in actions[0].reason
    assert "failure.max_restarts=2" in actions[2].reason


def test_zero_restarts_stops_at_the_first_failure():
    decision = decide([incident([died(0)])], FailureConfig(max_restarts=0))
    assert decision.action is Action.STOP


def test_user_errors_and_infrastructure_failures_have_separate_budgets():
    config = FailureConfig(max_restarts=1, max_user_errors=1, crash_loop_limit=5)
    history = [incident([died(0)], 0), incident([raised(1, step=3)], 1)]
    assert decide(history, config).action is Action.RESTART  # 1 of each: both within budget
    history.append(incident([raised(1, step=9)], 2))
    decision = decide(history, config)
    assert decision.action is Action.STOP and "failure.max_user_errors=1" in decision.reason


# --- crash loops -------------------------------------------------------------------------------

def test_the_same_user_error_crash_loop_limit_times_in_a_row_stops():
    config = FailureConfig(crash_loop_limit=3, max_user_errors=10)
    history = [incident([raised(0, step=5)], a) for a in range(3)]
    assert decide(history[:2], config).action is Action.RESTART
    decision = decide(history, config)
    assert decision.action is Action.STOP
    assert "3 times in a row is a crash loop (failure.crash_loop_limit=3)" in decision.reason
    assert "RuntimeError: boom" in decision.reason


def test_an_intermittent_error_is_not_a_crash_loop():
    config = FailureConfig(crash_loop_limit=2, max_user_errors=10)
    history = [incident([raised(0, step=s)], a) for a, s in enumerate([5, 9, 14, 20])]
    assert decide(history, config).action is Action.RESTART


def test_a_different_failure_in_between_breaks_the_loop():
    config = FailureConfig(crash_loop_limit=2, max_user_errors=10)
    history = [incident([raised(0)], 0), incident([died(1)], 1), incident([raised(0)], 2)]
    assert decide(history, config).action is Action.RESTART


# --- back-off ----------------------------------------------------------------------------------

def test_backoff_grows_for_failures_in_a_row_and_resets_after_sustained_progress():
    config = FailureConfig(backoff_initial_s=1, backoff_multiplier=2, backoff_max_s=5,
                           backoff_reset_after_s=60, max_restarts=100)
    history = []
    delays = []
    for attempt in range(6):
        history.append(incident([died(0)], attempt))
        delays.append(backoff_s(history, config))
    assert delays == [0, 1, 2, 4, 5, 5]
    history.append(incident([died(0)], 6, progress_s=120))  # ran 2 minutes, then failed
    assert backoff_s(history, config) == 0
    history.append(incident([died(0)], 7))
    assert backoff_s(history, config) == 1
    assert decide(history, config).delay_s == 1


# --- storage errors ------------------------------------------------------------------------------

def storage(rank, message="the save of step 8 failed: OSError: [Errno 28] No space left",
            error_type="StorageFailure"):
    return raised(rank, message=message, error_type=error_type)


def test_a_failed_save_is_a_storage_error_not_the_users_fault_nor_an_echo():
    # S3's own "Connection reset by peer" inside a storage error is not a peer's echo.
    results = [storage(0, "the save failed: Connection reset by peer"), storage(1)]
    assert {f.kind for f in classify(results, 0)} == {FailureKind.STORAGE_ERROR}
    assert not incident(results).is_user_error and incident(results).budget == "storage"


def test_storage_errors_have_their_own_budget_naming_it():
    config = FailureConfig(max_restarts=5, max_user_errors=5, max_storage_errors=1)
    history = [incident([died(0)], 0), incident([storage(0), storage(1)], 1)]
    decision = decide(history, config)
    assert decision.action is Action.RESTART
    assert "storage error 1 of 1 allowed (failure.max_storage_errors)" in decision.reason
    history.append(incident([storage(0)], 2))
    decision = decide(history, config)
    assert decision.action is Action.STOP and "failure.max_storage_errors=1" in decision.reason
    # ...and spending it leaves the infrastructure budget alone.
    assert decide(history[:1], config).action is Action.RESTART


def test_saves_that_keep_failing_stop_the_job_at_once_naming_the_setting():
    message = "2 saves in a row failed (checkpoint.max_failed_saves=2)"
    history = [incident([storage(0, message, "SavesKeepFailing"),
                         storage(1, message, "SavesKeepFailing")])]
    decision = decide(history, FailureConfig(max_storage_errors=10))
    assert decision.action is Action.STOP
    assert "checkpoint.max_failed_saves=2" in decision.reason


# --- a configuration only the workers can find wrong ---------------------------------------

def test_storage_the_ranks_do_not_share_stops_at_once_as_a_config_error():
    message = ("run.storage ./runs is not shared by every rank (each node writes to its own "
               "disk): use S3 or ...; rank 0 (a) does not see the probes of rank 1 (b)")
    results = [raised(0, message, 0, "StorageNotShared"), raised(1, message, 0, "StorageNotShared")]
    failures = classify(results, 0)
    assert {f.kind for f in failures} == {FailureKind.CONFIG_ERROR}
    decision = decide([incident(results)], FailureConfig(max_restarts=10))
    assert decision.action is Action.STOP and decision.config_error
    assert "use S3" in decision.reason and "fix the configuration" in decision.reason
    # Only that: other stops are the run's, not the configuration's (exit 1, not 2).
    assert not decide([incident([storage(0)])], FailureConfig(max_storage_errors=0)).config_error


def test_a_storage_path_a_worker_cannot_expand_is_a_config_error_too():
    results = [raised(1, "storage '$SCRATCH/runs' names $SCRATCH, which is not set", 0,
                      "ConfigError")]
    assert [f.kind for f in classify(results, 0)] == [FailureKind.CONFIG_ERROR]
