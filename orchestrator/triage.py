"""Triage: from what the worker group saw to what failed.

Where a failure goes:
  detected   -- worker_group.RayWorkerGroup.wait()/probe() turn run() results and Ray errors
                into RankResult values; hangs.ProgressWatch finds ranks without progress;
  triaged    -- here: which ranks are suspects worth a probe, and the root-cause failures
                among the ranks' results (a pure function: no Ray, no clock, no I/O);
  decided    -- failures.decide(), a pure function of the incident history and the config;
  handled    -- driver.Driver carries the decision out (RECOVERING or FAILED).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

from orchestrator.failures import (CONFIG_ERROR_TYPES, STORAGE_ERROR_TYPES, Failure,
                                   FailureKind)
from orchestrator.hangs import Hang


class Ending(str, enum.Enum):
    """How one rank's attempt ended."""

    FINISHED = "finished"
    """It trained to the last step."""
    STOPPED = "stopped"
    """It stopped early and cleanly after a checkpoint, as the driver asked (a resize)."""
    NOTICED = "noticed"
    """It stopped early after a checkpoint because it got a preemption notice itself."""
    RAISED = "raised"
    """The workload, or the worker's own code, raised an exception."""
    DIED = "died"
    """The process is gone (killed, OOM, segfault) or stopped answering."""
    NODE_DIED = "node_died"
    """Its node left the cluster."""
    HUNG = "hung"
    """It made no progress for its hang timeout (the driver killed it)."""

    @property
    def ok(self) -> bool:
        return self in (Ending.FINISHED, Ending.STOPPED, Ending.NOTICED)

    @property
    def gone(self) -> bool:
        """Its worker is lost to the attempt; a peer's connection errors echo it."""
        return self in (Ending.DIED, Ending.NODE_DIED, Ending.HUNG)


@dataclass(frozen=True)
class RankResult:
    """How one rank's attempt ended, as the worker group observed it."""

    rank: int
    step: int
    """The last step it finished; -1 when it could not say (a dead process)."""
    ending: Ending
    error_type: str = ""
    message: str = ""
    """The error, how it died, or why it stopped early (STOPPED, NOTICED)."""
    traceback: str = ""
    node_id: str = ""

    @property
    def ok(self) -> bool:
        return self.ending.ok


# Errors a rank gets because a *peer* went away: echoes of a root cause elsewhere, never the
# workload's fault. (gloo, NCCL and torch.distributed wordings.)
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|ECONNRESET|"
    r"Connection refused|NCCL communicator was aborted|ProcessGroup.*(aborted|shut ?down)|"
    r"Socket Timeout|Timed out waiting|Gloo connectFullMesh failed|"
    r"process group has been destroyed|Application timeout caused pair closure",
    re.IGNORECASE)


def is_peer_echo(result: RankResult) -> bool:
    return (result.ending is Ending.RAISED
            and result.error_type not in STORAGE_ERROR_TYPES  # S3's "connection reset" is ours
            and result.error_type not in CONFIG_ERROR_TYPES
            and bool(_PEER_LOST.search(result.message)))


def something_failed(results: dict[int, RankResult], hangs: list[Hang]) -> bool:
    return bool(hangs) or any(not r.ok for r in results.values())


def suspects(results: dict[int, RankResult], ranks: set[int]) -> set[int]:
    """The ranks worth probing: when every failure so far is a peer's "connection closed"
    echo, the cause is a rank that has not reported, and one that no longer answers is gone
    (its process or its node; Ray may not have noticed yet)."""
    failed = [r for r in results.values() if not r.ok]
    missing = ranks - set(results)
    if missing and failed and all(is_peer_echo(r) for r in failed):
        return missing
    return set()


def triage(results: dict[int, RankResult], hangs: list[Hang], last_steps: dict[int, int],
           attempt: int) -> list[Failure]:
    """The root-cause failures of an attempt (empty if none failed), from the ranks' results,
    the hangs found, and the furthest step each rank was seen to finish."""
    seen = dict(results)
    for h in hangs:
        seen[h.rank] = hung_result(h, seen.get(h.rank))
    return classify(with_known_steps(list(seen.values()), last_steps), attempt)


def hung_result(hang: Hang, previous: RankResult | None) -> RankResult:
    """A hung rank's result: the driver killed it, so whatever Ray said of it since (that it
    died) is the kill, not the cause."""
    base = previous or RankResult(rank=hang.rank, step=-1, ending=Ending.HUNG)
    return replace(base, ending=Ending.HUNG,
                   message=f"no progress for {hang.stalled_s:.0f}s in {hang.doing.words} "
                           f"(timeout {hang.timeout_s:.0f}s, {hang.why})")


def with_known_steps(results: list[RankResult], last_steps: dict[int, int]) -> list[RankResult]:
    """A dead rank cannot say where it was. The gang moves in lockstep, so the furthest step
    any rank is known to have reached is where the dead one died."""
    known = [r.step for r in results] + list(last_steps.values())
    gang_step = max(known, default=0)
    return [replace(r, step=gang_step) if r.step < 0 else r for r in results]


_KIND_OF_ENDING = {Ending.HUNG: FailureKind.HANG, Ending.NODE_DIED: FailureKind.NODE_DIED,
                   Ending.DIED: FailureKind.WORKER_DIED}


def kind_of(result: RankResult) -> FailureKind:
    if result.ending in _KIND_OF_ENDING:
        return _KIND_OF_ENDING[result.ending]
    if is_peer_echo(result):
        return FailureKind.COMMUNICATION
    if result.error_type in STORAGE_ERROR_TYPES:
        return FailureKind.STORAGE_ERROR
    if result.error_type in CONFIG_ERROR_TYPES:
        return FailureKind.CONFIG_ERROR
    return FailureKind.USER_ERROR


def classify(results: list[RankResult], attempt: int) -> list[Failure]:
    """The root-cause failures among the ranks' results (empty if none failed).

    Precedence: ranks that hung or whose node or process died; else the workload's own
    errors; peers' "connection closed" errors are echoes and are reported only when nothing
    else explains the incident.
    """
    failed = [r for r in results if not r.ok]
    gone = [r for r in failed if r.ending.gone]
    own_errors = [r for r in failed if not r.ending.gone and not is_peer_echo(r)]
    roots = gone or own_errors or failed
    return [Failure(kind=kind_of(r), rank=r.rank, step=r.step, message=r.message,
                    attempt=attempt, node_id=r.node_id, error_type=r.error_type,
                    traceback=r.traceback)
            for r in sorted(roots, key=lambda r: r.rank)]


def preemptions(results: dict[int, RankResult], attempt: int) -> list[Failure]:
    """The ranks that stopped because they got a preemption notice: their workers are about
    to go, and are replaced (an infrastructure failure, though nothing crashed)."""
    return [Failure(kind=FailureKind.PREEMPTED, rank=r.rank, step=r.step, message=r.message,
                    attempt=attempt, node_id=r.node_id)
            for r in sorted(results.values(), key=lambda r: r.rank)
            if r.ending is Ending.NOTICED]
