"""`orchestrator report RUN`: what happened in a run, and where its time went.

Everything comes from the run's event log (and summary.json, when the job has ended), read as
untrusted input: a malformed event is skipped. The text says how the job ended, its failures,
restarts and checkpoints, and its goodput with the time lost by cause (goodput.py); the PNG
shows loss against step and against wall time, with failures, restarts and checkpoint commits
marked, so a user sees where the time that was not training went.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.goodput import CAUSES, Breakdown, breakdown

_CAUSE_WORDS = {
    "startup": "start-up (workers, imports, restore)",
    "recovery": "recovery (detection, replacement, restore)",
    "recomputed": "recomputed steps (lost to restores)",
    "checkpoint_stall": "checkpoint stall",
    "finish": "finish (final save, teardown)",
    "other": "other (driver, between polls)",
}


def latest_job(events: list[Any]) -> list[dict[str, Any]]:
    """The events of the run's latest job, from its first driver's `job_start` (a run resumed
    by later jobs holds them all)."""
    events = [e for e in events if isinstance(e, dict)]
    starts = [i for i, e in enumerate(events) if e.get("kind") == "job_start"]
    if not starts:
        return events
    job_id = events[starts[-1]].get("job_id")
    first = next(i for i in starts if events[i].get("job_id") == job_id)
    return events[first:]


@dataclass
class RunStory:
    """The figures of one job, folded from its events."""

    events: list[dict[str, Any]]
    goodput: Breakdown
    status: str = "running"
    run: str = ""
    job_id: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)
    faults_fired: list[dict[str, Any]] = field(default_factory=list)
    loss: list[tuple[int, int, float, float]] = field(default_factory=list)
    """(attempt, step, seconds since the job started, loss) of each progress event."""
    first_steps: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0

    @classmethod
    def of(cls, all_events: list[Any]) -> "RunStory":
        events = latest_job(all_events)
        story = cls(events=events, goodput=breakdown(events))
        for e in events:
            kind, time_ = e.get("kind"), e.get("time")
            if not isinstance(time_, (int, float)):
                continue
            if kind == "job_start" and not story.t0:
                story.t0, story.run, story.job_id = time_, str(e.get("run", "")), str(
                    e.get("job_id", ""))
            elif kind == "failure":
                story.failures.append(e)
            elif kind == "restart":
                story.restarts.append(e)
            elif kind == "checkpoint_committed":
                story.commits.append(e)
            elif kind == "fault_fired":
                story.faults_fired.append(e)
            elif kind == "job_end":
                story.status = str(e.get("status", "ended"))
            elif kind == "progress":
                metrics = e.get("metrics")
                if isinstance(metrics, dict) and metrics:
                    value = metrics.get("loss", next(iter(metrics.values())))
                    step = e.get("step")
                    attempt = e.get("attempt", 0)
                    if (isinstance(value, (int, float)) and isinstance(step, int)
                            and isinstance(attempt, int)):
                        story.loss.append((attempt, step, time_ - story.t0, float(value)))
            elif kind == "first_step":
                story.first_steps.append(e)
        return story

    def since_start(self, event: dict[str, Any]) -> float:
        return float(event.get("time", self.t0)) - self.t0

    def text(self) -> str:
        g = self.goodput
        lines = [f"run {self.run or '?'} (job {self.job_id or '?'}): {self.status}, "
                 f"{g.steps_completed} steps in {g.wall_s:.1f} s"]
        kinds = collections.Counter(str(f.get("failure_kind", "?")) for f in self.failures)
        lines.append(f"failures: {len(self.failures)}" + (
            f" ({', '.join(f'{k} {n}' for k, n in kinds.most_common())})" if kinds else ""))
        if self.faults_fired:
            lines.append(f"injected faults that fired: {len(self.faults_fired)}")
        lines.append(f"restarts: {len(self.restarts)}"
                     + (f", from steps {', '.join(str(r.get('from_step')) for r in self.restarts)}"
                        if self.restarts else "")
                     + f"; steps lost and recomputed: {g.lost_steps}")
        lines.append(f"checkpoints committed: {len(self.commits)}"
                     + (f", the last at step {self.commits[-1].get('step')}"
                        if self.commits else ""))
        lines.append(f"goodput: {g.goodput:.2f} (productive {g.productive_s:.1f} s of "
                     f"{g.wall_s:.1f} s)")
        lines.append("time lost, by cause:")
        wall = g.wall_s or 1.0
        for cause in sorted(CAUSES, key=lambda c: -g.lost_s.get(c, 0.0)):
            seconds = g.lost_s.get(cause, 0.0)
            lines.append(f"  {_CAUSE_WORDS[cause]:<45} {seconds:8.1f} s {100 * seconds / wall:5.1f}%")
        return "\n".join(lines)


def plot(story: RunStory, path: str | Path) -> Path:
    """Draw loss against step and against wall time, failures, restarts and commits marked;
    write a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: a file, on any machine
    import matplotlib.pyplot as plt

    fig, (by_step, by_time, where) = plt.subplots(
        3, 1, figsize=(10, 9), constrained_layout=True, height_ratios=[3, 3, 1])
    # One line per attempt: a restore sends the loss back to an earlier step, and a line
    # joining the attempts would draw steps that never ran.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, attempt in enumerate(sorted({a for a, *_ in story.loss})):
        points = [(step, t, loss) for a, step, t, loss in story.loss if a == attempt]
        steps, seconds, losses = zip(*points)
        color = colors[i % len(colors)]
        by_step.plot(steps, losses, ".-", color=color, label=f"loss, attempt {attempt}")
        by_time.plot(seconds, losses, ".-", color=color, label=f"loss, attempt {attempt}")
    # Time without training after each failure: until the next attempt's first step.
    starts = sorted(t for e in story.first_steps
                    if (t := _trained_again_s(e, story.t0)) is not None)
    for i, failure in enumerate(story.failures):
        at = story.since_start(failure)
        back = next((t for t in starts if t > at), None)
        if back is not None:
            by_time.axvspan(at, back, color="tab:red", alpha=0.08,
                            label="no training (recovery)" if i == 0 else None)
    marks = [("failure", story.failures, "tab:red", "-", lambda e: e.get("step")),
             ("restart", story.restarts, "tab:orange", "--", lambda e: e.get("from_step")),
             ("checkpoint commit", story.commits, "tab:green", ":", lambda e: e.get("step"))]
    for label, events, color, style, step_of in marks:
        for i, e in enumerate(events):
            name = f"{label} ({len(events)})" if i == 0 else None
            step = step_of(e)
            if isinstance(step, (int, float)):
                by_step.axvline(step, color=color, linestyle=style, alpha=0.8, label=name)
            by_time.axvline(story.since_start(e), color=color, linestyle=style, alpha=0.8,
                            label=name)
    g = story.goodput
    by_step.set(xlabel="step", ylabel="loss",
                title=f"{story.run or 'run'}: {story.status}, goodput {g.goodput:.2f}, "
                      f"{len(story.failures)} failures, {len(story.restarts)} restarts")
    by_time.set(xlabel="seconds since the job started", ylabel="loss")
    _draw_breakdown(where, g)
    for ax in (by_step, by_time):
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_breakdown(ax: Any, g: Breakdown) -> None:
    """One bar of the job's wall time: productive, then each cause of lost time."""
    parts = [("productive", g.productive_s, "tab:green")] + [
        (cause, g.lost_s.get(cause, 0.0), color) for cause, color in zip(
            CAUSES, ["tab:gray", "tab:red", "tab:orange", "tab:purple", "tab:brown",
                     "lightgray"])]
    left = 0.0
    for name, seconds, color in parts:
        if seconds <= 0:
            continue
        ax.barh([0], [seconds], left=left, color=color, label=f"{name} {seconds:.1f}s")
        left += seconds
    ax.set(yticks=[], xlabel="seconds of the job's wall time",
           title=f"where the time went: goodput {g.goodput:.2f}")
    if left > 0:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=4, fontsize="small")


def _trained_again_s(event: dict[str, Any], t0: float) -> float | None:
    """When an attempt's first step ended, in seconds since the job started."""
    end = event.get("step_end_time")
    return float(end) - t0 if isinstance(end, (int, float)) else None
