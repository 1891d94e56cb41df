"""What a failed save means, and what happens next: pure functions, no I/O.

A save fails for its storage (ENOSPC, EACCES, S3 errors after botocore's retries, a commit
that could not be written) far more often than for a bug, and the two need different
answers: a bug in the workload is a `user_error` and ends in a crash loop; a storage failure
is a `storage_error` (failures.py), with its own budget, and `checkpoint.on_save_error` says
whether training goes on without that checkpoint or stops at it.
"""

from __future__ import annotations

import enum

from torch.distributed.checkpoint.api import CheckpointException

from orchestrator.config import CheckpointConfig
from orchestrator.errors import StorageError


class AfterFailedSave(enum.IntEnum):
    """Ordered: ranks agree on the most severe (an all-reduce MAX)."""

    CONTINUE = 0
    """Train on; the next due save tries again."""
    RESTART = 1
    """End the attempt as a storage_error: the driver resumes from the last commit."""
    STOP = 2
    """Stop the job: `checkpoint.max_failed_saves` saves in a row failed."""


def after_failed_save(failed_in_row: int, config: CheckpointConfig) -> AfterFailedSave:
    if config.on_save_error == "stop":
        return AfterFailedSave.RESTART
    if failed_in_row >= config.max_failed_saves:
        return AfterFailedSave.STOP
    return AfterFailedSave.CONTINUE


def explain(action: AfterFailedSave, step: int, failed_in_row: int, error: str,
            config: CheckpointConfig) -> str:
    """The one line a failed save ends an attempt (or the job) with."""
    what = f"the save of step {step} failed: {error}"
    if action is AfterFailedSave.STOP:
        return (f"{what}; {failed_in_row} saves in a row failed "
                f"(checkpoint.max_failed_saves={config.max_failed_saves})")
    if action is AfterFailedSave.RESTART:
        return f"{what}; checkpoint.on_save_error=stop ends the attempt"
    return (f"{what}; training goes on (checkpoint.on_save_error=continue, "
            f"{failed_in_row} of checkpoint.max_failed_saves={config.max_failed_saves})")


def is_storage_error(error: BaseException) -> bool:
    """Whether a save failed for its storage rather than for a bug: an OSError (s3fs turns
    S3's answers into them), a botocore error, or one of ours about storage, found in the
    error, what caused it, or any rank's error that DCP gathered into a CheckpointException."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (OSError, StorageError)):
            return True
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore"):
            return True
        if isinstance(e, CheckpointException):
            todo.extend(failure[0] if isinstance(failure, tuple) else failure
                        for failure in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return False
