"""How checkpoint errors read in events and messages: one line each."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException

_KEYS_SHOWN = 8


def describe_error(e: BaseException) -> str:
    """One line per failed rank: DCP wraps every rank's error in a CheckpointException whose
    str() is a page of traceback."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}"
                         for rank, (exc, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {str(e)[:500]}"


def few(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more
