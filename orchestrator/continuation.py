"""What a new driver takes over from the run's event log (a pure function of the events).

A driver that starts on a run whose last `job_start` has no `job_end` after it was started
after its predecessor died (a crash, a SIGKILL, a scheduler that lost the job): it continues
that job rather than starting it again. It keeps the job's id (so it knows which committed
checkpoints the job wrote itself), whether the job already committed a checkpoint (from then
on restarts resume from the latest, whatever `checkpoint.restore` says, so a start-over is
never applied twice), the failures so far (the budgets and the crash-loop history carry
over), and the attempt count. A run whose last job ended is started anew by the next
`orchestrator run`: `checkpoint.restore` applies again.

Events come from storage: anything malformed in them is skipped, never trusted to crash us.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.failures import Failure, FailureKind, Incident


@dataclass(frozen=True)
class Continuation:
    job_id: str
    """'' when this driver starts a new job."""
    committed: bool = False
    incidents: tuple[Incident, ...] = ()
    next_attempt: int = 0
    started_at: float = 0.0
    """When the job's first driver started it (epoch seconds): chaos times count from it."""

    @property
    def continuing(self) -> bool:
        return bool(self.job_id)


def _failure(e: dict) -> Failure | None:
    try:
        return Failure(kind=FailureKind(e["failure_kind"]), rank=int(e["rank"]),
                       step=int(e["step"]), message=str(e.get("message", "")),
                       attempt=int(e["attempt"]), node_id=str(e.get("node_id", "")),
                       error_type=str(e.get("error_type", "")),
                       traceback=str(e.get("traceback", "")))
    except (KeyError, ValueError, TypeError):
        return None


def continuation(events: list[dict]) -> Continuation:
    ends = [i for i, e in enumerate(events) if e.get("kind") == "job_end"]
    job = events[ends[-1] + 1:] if ends else events
    starts = [e for e in job if e.get("kind") == "job_start"]
    if not starts or not isinstance(starts[0].get("job_id"), str) or not starts[0]["job_id"]:
        return Continuation(job_id="")
    by_attempt: dict[int, list[Failure]] = {}
    progress: dict[int, float] = {}
    attempts = [-1]
    for e in job:
        kind = e.get("kind")
        if isinstance(e.get("attempt"), int):
            attempts.append(e["attempt"])
        if kind == "failure" and (f := _failure(e)) is not None:
            by_attempt.setdefault(f.attempt, []).append(f)
        elif kind == "decision" and isinstance(e.get("attempt"), int):
            progress[e["attempt"]] = float(e.get("progress_s") or 0.0)
    incidents = tuple(Incident(attempt=a, failures=tuple(fs), progress_s=progress.get(a, 0.0))
                      for a, fs in sorted(by_attempt.items()))
    return Continuation(job_id=starts[0]["job_id"],
                        committed=any(e.get("kind") == "checkpoint_committed" for e in job),
                        incidents=incidents, next_attempt=max(attempts) + 1,
                        started_at=_number(starts[0].get("time")))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
