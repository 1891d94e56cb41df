"""Failures as data: detection signals -> classified failures -> a policy decision.

Where things happen:
  detected  -- worker_group.RayWorkerGroup.wait() turns run() results and Ray errors into
               RankResult values;
  classified -- classify() here picks the root cause among the ranks' results;
  decided   -- decide() here, a pure function of the failure history and the config;
  handled   -- driver.Driver carries the decision out (RECOVERING or FAILED).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.config import FailureConfig


class FailureKind(str, enum.Enum):
    WORKER_DIED = "worker_died"
    """The worker process is gone (killed, OOM, segfault): Ray reports the actor dead."""
    USER_ERROR = "user_error"
    """The workload raised an exception."""
    START_FAILED = "start_failed"
    """The gang could not be started or could not form its process group in time."""


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
class RankResult:
    """How one rank's attempt ended, as the worker group observed it."""

    rank: int
    step: int
    ok: bool
    died: bool = False
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    node_id: str = ""


def classify(results: list[RankResult], attempt: int) -> list[Failure]:
    """The root-cause failures among the ranks' results (empty if none failed).

    A SIGKILLed rank makes its peers' collectives fail a moment later ("Connection closed by
    peer"): those are echoes, so when any rank died, only the dead ranks are reported.
    """
    dead = [r for r in results if r.died]
    errors = [r for r in results if not r.ok and not r.died]
    roots = dead or errors
    kind = FailureKind.WORKER_DIED if dead else FailureKind.USER_ERROR
    return [Failure(kind=kind, rank=r.rank, step=r.step, message=r.message, attempt=attempt,
                    node_id=r.node_id, error_type=r.error_type, traceback=r.traceback)
            for r in sorted(roots, key=lambda r: r.rank)]


class Action(str, enum.Enum):
    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    """The numbers behind the decision, for the log ("restart 2 of 3 allowed")."""


def decide(incidents: list[list[Failure]], config: FailureConfig) -> Decision:
    """What to do after the latest incident. `incidents` is every incident of the run so far,
    oldest first; each is the root-cause failures of one attempt."""
    restarts_used = len(incidents) - 1
    latest = describe(incidents[-1])
    if restarts_used >= config.max_restarts:
        return Decision(Action.STOP,
                        f"{latest}; {len(incidents)} failures and failure.max_restarts="
                        f"{config.max_restarts} allows no more restarts (raise it to allow more)")
    return Decision(Action.RESTART,
                    f"{latest}; restart {restarts_used + 1} of {config.max_restarts} allowed")


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
