"""The job's figures as Ray metrics (ray.util.metrics), on each node's Prometheus endpoint.

A watcher of the driver's events, like the progress display: every figure here is also in
the event log, so a dashboard and `orchestrator report` never disagree. Ray prefixes the
names with `ray_` and adds `_total` to counters:

    ray_orchestrator_steps_total{run}                   steps computed (recomputed ones too)
    ray_orchestrator_restarts_total{run,kind}           restarts, by the kind of failure
    ray_orchestrator_checkpoint_save_seconds{run}       writing a checkpoint's shards (histogram)
    ray_orchestrator_checkpoint_commit_seconds{run}     checking and committing it (histogram)
    ray_orchestrator_training_stall_seconds_total{run}  training blocked by saves
    ray_orchestrator_goodput{run}                       productive time / wall time so far
    ray_orchestrator_step{run}                          the latest step

The embedded Ray of `orchestrator run --metrics-export-port P` serves them on 127.0.0.1:P;
on a cluster, at each node's metrics export port (`ray start --metrics-export-port`).
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.goodput import GoodputLedger

_SECONDS_BUCKETS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]


class RunMetrics:
    """Call with each event; records into Ray's metrics (needs a connected Ray)."""

    def __init__(self, run_name: str, goodput: GoodputLedger) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"run": run_name}
        self._goodput = goodput
        self._steps = Counter("orchestrator_steps", "Training steps computed (recomputed too).",
                              tag_keys=("run",))
        self._restarts = Counter("orchestrator_restarts",
                                 "Restarts of the gang, by the kind of failure behind them.",
                                 tag_keys=("run", "kind"))
        self._save_s = Histogram("orchestrator_checkpoint_save_seconds",
                                 "Seconds to write a checkpoint's shards.",
                                 boundaries=_SECONDS_BUCKETS, tag_keys=("run",))
        self._commit_s = Histogram("orchestrator_checkpoint_commit_seconds",
                                   "Seconds from the shards written to the manifest committed.",
                                   boundaries=_SECONDS_BUCKETS, tag_keys=("run",))
        self._stall_s = Counter("orchestrator_training_stall_seconds",
                                "Seconds training was blocked by checkpoint saves.",
                                tag_keys=("run",))
        self._goodput_gauge = Gauge("orchestrator_goodput",
                                    "Productive time over wall time, so far in the job.",
                                    tag_keys=("run",))
        self._step = Gauge("orchestrator_step", "The latest step of rank 0.", tag_keys=("run",))
        for metric in (self._steps, self._save_s, self._commit_s, self._stall_s,
                       self._goodput_gauge, self._step):
            metric.set_default_tags(tags)
        self._run_name = run_name
        self._failure_kind = ""
        """The kind of the first failure since the last restart: what the next restart is for."""

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "progress":
            span = event.get("span") or {}
            steps = span.get("last", 0) - span.get("first", 0) + 1
            if steps > 0:
                self._steps.inc(steps)
            self._step.set(float(event.get("step") or 0))
            self._goodput_gauge.set(self._goodput.breakdown(time.time()).goodput)
        elif kind == "failure" and not self._failure_kind:
            self._failure_kind = str(event.get("failure_kind") or "")
        elif kind == "restart":
            self._restarts.inc(1, tags={"run": self._run_name,
                                        "kind": self._failure_kind or "resize"})
            self._failure_kind = ""
        elif kind == "checkpoint_committed":
            write_s, total_s = event.get("write_s"), event.get("total_s")
            if isinstance(write_s, (int, float)):
                self._save_s.observe(float(write_s))
                if isinstance(total_s, (int, float)):
                    self._commit_s.observe(max(float(total_s) - float(write_s), 0.0))
        elif kind == "checkpoint_stall":
            stalled = float(event.get("blocked_s") or 0) + float(event.get("gate_wait_s") or 0)
            if stalled > 0:
                self._stall_s.inc(stalled)
        elif kind == "job_end":
            self._goodput_gauge.set(self._goodput.breakdown(time.time()).goodput)
