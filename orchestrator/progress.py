"""What a user watching `orchestrator run` sees: a live bar in a terminal, plain lines elsewhere.

A watcher of the driver's events (EventLog.subscribe). In a terminal, a tqdm bar: step/total,
loss, steps/s, the last committed step, restarts, goodput and the ETA, with the log lines
printed above it. Anywhere else (a Ray job's log, a file, CI) no escapes: one line per
progress event (every few seconds) that reads on its own:

    step 23/60 loss=0.3917 | 11.8 steps/s | committed 20 | restarts 1 | goodput 0.41 | eta 3s
"""

from __future__ import annotations

import logging
import time
from typing import IO, Any

from orchestrator.goodput import GoodputLedger

log = logging.getLogger("orchestrator.progress")

_RATE_SMOOTHING = 0.3
"""Weight of the newest span in the steps/s average: the ETA follows a change of speed within
a few spans, and is not thrown by one slow one."""


class ProgressState:
    """The figures shown, folded from events; the two displays only format them."""

    def __init__(self, total_steps: int | None, goodput: GoodputLedger | None = None) -> None:
        self.total_steps = total_steps
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.steps_per_s: float | None = None
        self.committed_step: int | None = None
        self.restarts = 0
        self._goodput = goodput

    def add(self, event: dict[str, Any]) -> bool:
        """Fold `event` in; True if the shown figures changed at a step (a progress event)."""
        kind = event.get("kind")
        if kind == "checkpoint_committed":
            self.committed_step = event.get("step")
        elif kind == "restart":
            self.restarts += 1
        elif kind == "progress":
            self.step = int(event.get("step") or 0)
            self.metrics = dict(event.get("metrics") or {})
            span = event.get("span") or {}
            steps = span.get("last", 0) - span.get("first", 0) + 1
            seconds = span.get("end", 0.0) - span.get("start", 0.0)
            if steps > 0 and seconds > 0:
                rate = steps / seconds
                self.steps_per_s = rate if self.steps_per_s is None else (
                    _RATE_SMOOTHING * rate + (1 - _RATE_SMOOTHING) * self.steps_per_s)
            return True
        return False

    @property
    def eta_s(self) -> float | None:
        if not self.total_steps or not self.steps_per_s:
            return None
        return max(self.total_steps - self.step, 0) / self.steps_per_s

    @property
    def goodput(self) -> float | None:
        return self._goodput.breakdown(time.time()).goodput if self._goodput else None

    def fields(self) -> list[str]:
        """The figures after the step, formatted: loss=..., steps/s, committed, restarts..."""
        out = [" ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())] if self.metrics else []
        if self.steps_per_s:
            out.append(f"{self.steps_per_s:.3g} steps/s")
        out.append(f"committed {self.committed_step if self.committed_step else '-'}")
        out.append(f"restarts {self.restarts}")
        if (goodput := self.goodput) is not None:
            out.append(f"goodput {goodput:.2f}")
        return out


class PlainProgress:
    """One log line per progress event: for logs, where a bar would be escapes."""

    def __init__(self, state: ProgressState) -> None:
        self.state = state

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.state.add(event):
            return
        s = self.state
        step = f"step {s.step}/{s.total_steps}" if s.total_steps else f"step {s.step}"
        eta = s.eta_s
        tail = [f"eta {_duration(eta)}"] if eta is not None else []
        log.info("%s", " | ".join([f"{step} {' | '.join(s.fields())}", *tail]))

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on a terminal; log records are written above it, not through it."""

    def __init__(self, state: ProgressState, stream: IO[str]) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.state = state
        # tqdm's own rate and ETA would count the start-up and go wrong when a restore moves
        # the bar back: ours (from the steps' own times) go in the postfix instead.
        self._bar = tqdm(total=state.total_steps, file=stream, unit="step", dynamic_ncols=True,
                         desc="training",
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                    "[{elapsed}] {postfix}")
        # Log lines go through tqdm.write, so they print above the bar instead of tearing it.
        self._redirect = logging_redirect_tqdm(
            loggers=[logging.getLogger()])
        self._redirect.__enter__()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.state.add(event):
            if event.get("kind") in ("restart", "checkpoint_committed"):
                self._bar.set_postfix_str(self._postfix(), refresh=True)
            return
        # A restore moves the bar back: the steps after the checkpoint are computed again.
        self._bar.n = self.state.step
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.refresh()

    def _postfix(self) -> str:
        eta = self.state.eta_s
        return " | ".join(self.state.fields() + ([f"eta {_duration(eta)}"] if eta is not None
                                                 else []))

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self._bar.close()


def progress_display(stream: IO[str], total_steps: int | None,
                     goodput: GoodputLedger | None = None) -> PlainProgress | BarProgress:
    """A bar if `stream` is a terminal, else plain lines."""
    state = ProgressState(total_steps, goodput)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return BarProgress(state, stream)
    return PlainProgress(state)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
