"""Failures as data: what failed (triage.py finds it) -> a policy decision.

Where things happen:
  detected   -- worker_group.RayWorkerGroup.wait() turns run() results and Ray errors into
                RankResult values; hangs.ProgressWatch finds ranks without progress;
  triaged    -- triage.triage() picks the root-cause failures among the ranks' results;
  decided    -- decide() here, a pure function of the incident history and the config;
  handled    -- driver.Driver carries the decision out (RECOVERING or FAILED).
Nothing here imports Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.config import FailureConfig


class FailureKind(str, enum.Enum):
    WORKER_DIED = "worker_died"
    """The worker process is gone (killed, OOM, segfault): Ray reports the actor dead."""
    NODE_DIED = "node_died"
    """The node hosting the worker left the cluster (preempted VM, lost raylet)."""
    HANG = "hang"
    """No progress for failure.hang_timeout_s (blocked collective, stopped process)."""
    PREEMPTED = "preempted"
    """The worker got a preemption notice (SIGTERM, node drain) and stopped after a save."""
    COMMUNICATION = "communication_error"
    """A collective failed because a peer's connection broke, and no peer is known to be
    gone (a network fault)."""
    START_FAILED = "start_failed"
    """The gang could not be started or could not form its process group in time."""
    STORAGE_ERROR = "storage_error"
    """The run's storage failed: a save could not be written or committed (disk full, no
    permission, S3 errors after retries), or no checkpoint could be read at a restore."""
    CONFIG_ERROR = "config_error"
    """The job's configuration cannot work on this cluster, as only the workers can see
    (a local run.storage on several nodes): the job stops at once, exit 2."""
    USER_ERROR = "user_error"
    """The workload raised an exception."""

    @property
    def is_infrastructure(self) -> bool:
        return self is not FailureKind.USER_ERROR


# How the workers' StorageFailure errors (errors.py) are recognised in a triage.RankResult:
# by name, since a worker's exception reaches the driver as data.
STORAGE_ERROR_TYPES = ("StorageFailure", "SavesKeepFailing")
FATAL_STORAGE_ERROR = "SavesKeepFailing"
CONFIG_ERROR_TYPES = ("StorageNotShared", "ConfigError")


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    rank: int
    step: int
    message: str
    attempt: int
    node_id: str = ""
    error_type: str = ""
    traceback: str = ""

    def to_event(self) -> dict:
        return {"failure_kind": self.kind.value, "rank": self.rank, "step": self.step,
                "message": self.message, "attempt": self.attempt, "node_id": self.node_id,
                "error_type": self.error_type, "traceback": self.traceback}


@dataclass(frozen=True)
class Incident:
    """One failed attempt: its root-cause failures, and how long it made progress."""

    attempt: int
    failures: tuple[Failure, ...]
    progress_s: float = 0.0
    """How long the attempt trained (first to last completed step) before it failed."""

    @property
    def is_user_error(self) -> bool:
        return all(f.kind is FailureKind.USER_ERROR for f in self.failures)

    @property
    def budget(self) -> str:
        """Which restart budget the incident spends: `user`, `storage` or `infrastructure`."""
        if self.is_user_error:
            return "user"
        if any(f.kind is FailureKind.STORAGE_ERROR for f in self.failures):
            return "storage"
        return "infrastructure"

    @property
    def signature(self) -> frozenset[tuple[str, str, int]]:
        """What makes two user errors 'the same': type, message and step of each rank's."""
        return frozenset((f.error_type, first_line(f.message), f.step) for f in self.failures)


class Action(str, enum.Enum):
    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    """The numbers behind the decision, for the log ("restart 2 of 3 allowed")."""
    delay_s: float = 0.0
    """Back-off before the restart."""
    config_error: bool = False
    """The stop is the configuration's fault, not the run's: the CLI exits 2, as for a bad
    config found before the start."""


def decide(incidents: list[Incident], config: FailureConfig) -> Decision:
    """What to do after the latest incident; `incidents` is the run's history, oldest first.

    Infrastructure failures, storage errors and user errors have separate budgets; the same
    user error `crash_loop_limit` times in a row stops the job at once, since restarting a
    deterministic bug only burns the budget; `checkpoint.max_failed_saves` failed saves in a
    row stop it at once too, and so does a configuration the workers found cannot work.
    """
    latest = incidents[-1]
    what = describe(list(latest.failures))
    if any(f.kind is FailureKind.CONFIG_ERROR for f in latest.failures):
        return Decision(Action.STOP, f"{what}; fix the configuration and run again",
                        config_error=True)
    if any(f.error_type == FATAL_STORAGE_ERROR for f in latest.failures):
        return Decision(Action.STOP, f"{what}; the job stops rather than train on without "
                                     "checkpoints (raise checkpoint.max_failed_saves, or fix "
                                     "the storage and run again to resume)")
    if latest.is_user_error:
        repeats = 0
        for incident in reversed(incidents):
            if not (incident.is_user_error and incident.signature == latest.signature):
                break
            repeats += 1
        if repeats >= config.crash_loop_limit:
            return Decision(Action.STOP,
                            f"{what}; the same error {repeats} times in a row is a crash loop "
                            f"(failure.crash_loop_limit={config.crash_loop_limit}): fix the "
                            f"workload, restarting will not help")
    budget, setting, kind = {
        "user": (config.max_user_errors, "failure.max_user_errors", "user error"),
        "storage": (config.max_storage_errors, "failure.max_storage_errors", "storage error"),
        "infrastructure": (config.max_restarts, "failure.max_restarts",
                           "infrastructure failure"),
    }[latest.budget]
    used = sum(1 for i in incidents if i.budget == latest.budget)
    if used > budget:
        return Decision(Action.STOP,
                        f"{what}; {kind} {used} exceeds {setting}={budget} "
                        f"(raise it to allow more restarts)")
    delay_s = backoff_s(incidents, config)
    return Decision(Action.RESTART,
                    f"{what}; {kind} {used} of {budget} allowed ({setting}), "
                    f"restart in {delay_s:.1f}s", delay_s=delay_s)


def backoff_s(incidents: list[Incident], config: FailureConfig) -> float:
    """No wait after a failure that follows sustained progress; then initial, x multiplier,
    ... up to the maximum for each further failure in a row."""
    streak = 0
    for incident in reversed(incidents):
        streak += 1
        if incident.progress_s >= config.backoff_reset_after_s:
            break
    if streak <= 1:
        return 0.0
    return min(config.backoff_initial_s * config.backoff_multiplier ** (streak - 2),
               config.backoff_max_s)


def describe(failures: list[Failure]) -> str:
    """One line for an incident; identical errors of several ranks are grouped."""
    groups: dict[tuple[str, str], list[int]] = {}
    for f in failures:
        groups.setdefault((f.kind.value, first_line(f.message)), []).append(f.rank)
    parts = []
    for (kind, message), ranks in groups.items():
        who = ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))
        parts.append(f"{who}: {kind}" + (f": {message}" if message else ""))
    return "; ".join(parts)


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""
