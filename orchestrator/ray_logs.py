"""Ray's own lines on the driver's terminal, made to say what they mean for this job.

When a worker dies, the raylet pushes a banner to every driver ("A worker died or was killed
while executing a task by an unexpected system error. To troubleshoot the problem, ...", some
600 characters in yellow): in a chaos run it is the loudest line, and it says nothing about
what happens next. The driver's own lines do ("attempt 0 failed: rank 1: worker_died ... ->
restart", "attempt 1: replacing rank(s) 1, resuming from the checkpoint of step 20"), so
the banner becomes one short line at INFO; every other line of Ray's passes as it was.

Ray prints these from `ray._private.worker.listen_error_messages` through the module's
`print_to_stdstream`, which is private: if a Ray release moves it, `quiet_worker_deaths`
does nothing and the banner prints as before.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("orchestrator.ray")

_BANNER = "A worker died or was killed while executing a task"
_PID = re.compile(r"Worker PID: (\d+)")
_EXIT_TYPE = re.compile(r"Worker exit type: (\w+)")
_DETAIL = re.compile(r"Worker exit detail: (.*?)(?: Some common causes| There are|$)")


def shorten(line: str) -> str | None:
    """The one line that replaces Ray's worker-death banner, or None if `line` is not one."""
    if _BANNER not in line:
        return None
    pid, why, detail = (m.group(1).strip() if (m := p.search(line)) else ""
                        for p in (_PID, _EXIT_TYPE, _DETAIL))
    pid, why = pid or "?", why or "unknown"
    return (f"Ray: worker process {pid} exited ({why}{': ' + detail[:120] if detail else ''});"
            " the orchestrator handles it")


def quiet_worker_deaths() -> bool:
    """Replace Ray's worker-death banner on this driver's output by one line; True if Ray's
    printer was found."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return False
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_orchestrator_quiet", False):
        return original is not None

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            kept = []
            for line in data.get("lines") or []:
                short = shorten(line) if isinstance(line, str) else None
                if short is None:
                    kept.append(line)
                else:
                    log.info("%s", short)
            if not kept:
                return None
            data = {**data, "lines": kept}
        return original(data, ignore_prefix, *args, **kwargs)

    print_to_stdstream._orchestrator_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream
    return True
