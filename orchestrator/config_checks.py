"""The checks every config section makes of its values, with one wording for their errors."""

from __future__ import annotations

import math
from typing import Any

from orchestrator.errors import ConfigError

MAX_SECONDS = 30 * 24 * 3600.0
"""The longest duration a setting may take (30 days). Larger values overflow the waits they
become (`threading.Event.wait` refuses them), so they are refused here instead."""


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {_short(value)} is not allowed; {allowed}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _seconds(key: str, value: float, *, minimum: float = 0.0, zero_ok: bool = True) -> None:
    ok = (math.isfinite(value) and minimum <= value <= MAX_SECONDS
          and (zero_ok or value > 0))
    low = f">= {minimum:g}" if zero_ok else f"> {minimum:g}"
    _require(ok, key, f"it must be a number of seconds {low} and at most {MAX_SECONDS:g}",
             value)
