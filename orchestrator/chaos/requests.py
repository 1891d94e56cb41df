"""Faults sent into a running job from outside, and the markers of faults that fired.

`orchestrator chaos` writes one request file under `<run>/chaos-requests/`; the running
driver lists that folder once a second and carries the new ones out. Anyone who can write the
run's storage can write there, so a request is untrusted input: it is size-capped, parsed as
JSON and validated as a `FaultSpec`, and a bad one is refused (an event), never run.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import socket
import time
import uuid
from typing import Any

from orchestrator.chaos.config import FaultSpec
from orchestrator.chaos.plan import Fault
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import is_temporary

MAX_REQUEST_BYTES = 16 * 1024
MAX_MARKER_BYTES = 16 * 1024


def request_fault(layout: RunLayout, spec: FaultSpec, injected_by: str = "") -> Fault:
    """Ask the run's driver to inject `spec`; returns the fault, whose id names its marker."""
    injected_by = injected_by or caller()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    fault = Fault(spec=spec, id=f"cli-{stamp}-{uuid.uuid4().hex[:6]}-{spec.kind}",
                  source=f"orchestrator chaos by {injected_by}")
    body = {"fault": dataclasses.asdict(spec), "injected_by": injected_by,
            "requested_at": round(time.time(), 3)}
    layout.storage.makedirs(*layout.chaos_requests)
    layout.storage.write_atomic(json.dumps(body).encode(), *layout.chaos_requests,
                                f"{fault.id}.json")
    return fault


def caller() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 -- no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def read_request(layout: RunLayout, name: str) -> Fault:
    """One request file as a Fault; ValueError (with why) for anything but a valid one."""
    from orchestrator.config import from_dict
    from orchestrator.errors import ConfigError

    if not name.endswith(".json") or not name.startswith("cli-"):
        raise ValueError(f"{name!r} is not a request file name")
    data = layout.storage.read_bytes(*layout.chaos_requests, name)
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"{len(data)} bytes, more than a request ever has")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(body, dict) or not isinstance(body.get("injected_by", ""), str):
        raise ValueError("not a fault request")
    try:
        spec = from_dict(FaultSpec, body.get("fault"), "fault")
    except ConfigError as e:
        raise ValueError(str(e)) from e
    injected_by = body.get("injected_by", "")[:200] or "someone unnamed"
    return Fault(spec=spec, id=name[:-len(".json")], source=f"orchestrator chaos by {injected_by}")


def fired_markers(layout: RunLayout) -> list[str]:
    """Names of the markers of every fault that fired in this run. A marker being written
    may be listed as its temporary file too, complete: counted, it reported a fault as fired
    twice (the chaos e2e test, once in a full suite)."""
    return [e.name for e in layout.storage.list_dir(*layout.chaos) if not is_temporary(e.name)]


def read_marker(layout: RunLayout, name: str) -> dict[str, Any]:
    """What a marker says about its firing; {} when it says nothing readable (an old-format
    empty marker, or one someone else wrote): the name alone still counts."""
    try:
        data = layout.storage.read_bytes(*layout.chaos, name)
        record = json.loads(data) if len(data) <= MAX_MARKER_BYTES else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items()
            if isinstance(k, str) and k not in ("kind", "time")
            and isinstance(v, (str, int, float)) and len(str(v)) < 300}
