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


def few(items: list[str], sep: str = ", ") -> str:
    """The first few of `items`, and how many more there are."""
    if not items:
        return "none"
    more = f" and {len(items) - _KEYS_SHOWN} more" if len(items) > _KEYS_SHOWN else ""
    return sep.join(items[:_KEYS_SHOWN]) + more
