"""What the driver and the workers say to each other: plain, picklable, frozen data."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from orchestrator.chaos.plan import Fault
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.config import CheckpointConfig


@dataclass(frozen=True)
class WorkerInfo:
    node_id: str
    node_ip: str
    pid: int
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rendezvous:
    """How the gang forms its torch.distributed process group."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    backend: str
    timeout_s: float


@dataclass(frozen=True)
class AttemptSpec:
    """Everything a worker needs to run one attempt of the job."""

    attempt: int
    entrypoint: str
    args: dict[str, Any]
    storage_url: str
    run_name: str
    parallelism: str
    checkpoint: CheckpointConfig
    restore: RestorePlan
    """Which committed steps to try, in order; the first that verifies is restored."""
    faults: list[Fault] = field(default_factory=list)
    job_id: str = ""
    """The job these workers belong to: written into every manifest they commit."""
    fencing_token: int = 0
    """The driver's lease generation: a commit checks that no newer one exists (0: none)."""
    storage_probe: str = ""
    """The token of the probe the driver wrote for this attempt (storage_probe.py)."""


@dataclass(frozen=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str

    @staticmethod
    def from_exception(e: BaseException) -> "ErrorInfo":
        return ErrorInfo(type=type(e).__name__, message=str(e).strip()[:2000],
                         traceback="".join(traceback.format_exception(e))[-20000:])


@dataclass(frozen=True)
class WorkerOutcome:
    """The return value of a worker's run(): it finished, or the workload raised."""

    rank: int
    step: int
    error: ErrorInfo | None = None
    stopped: str = ""
    """Why the attempt ended early but cleanly, after a checkpoint ("" if it ran to the end)."""
    got_notice: bool = False
    """This rank itself received the preemption notice (SIGTERM or its node draining)."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkerReport:
    """What a poll of a live worker returns: progress, step times, events since last poll."""

    rank: int
    step: int
    metrics: dict[str, float]
    progress_seq: int
    step_durations: list[tuple[int, float, float]]
    """(step, duration_s, end time) of each step finished since the last poll."""
    events: list[dict[str, Any]]
    doing: str = "step"
    """What the training thread does now (an orchestrator.hangs.Activity value)."""
    slowest_s: dict[str, float] = field(default_factory=dict)
    """Per activity ended since the last poll, the longest it took (from the sign of progress
    before it to the one that ended it)."""
