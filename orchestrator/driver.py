"""The control loop: an explicit state machine over a WorkerGroup.

    STARTING -> RUNNING -> SUCCEEDED
                   |
                   +--> (failure) -> RECOVERING -> STARTING -> RUNNING ...
                   +--> (policy says stop) -> FAILED

`run()` is `while not state.terminal: step()`; each state's handler returns the next state,
and `step()` is the one place that sets it (through `_set_state`, which logs a transition).
What the driver knows of the attempt in flight is an `Attempt`, made anew by each start.
The driver keeps nothing that is not in storage: checkpoints,
fired faults and the event log all live there, so a new driver on the same run resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from orchestrator.chaos.inject import write_marker
from orchestrator.chaos.plan import Fault, FaultPlan
from orchestrator.chaos.schedule import ChaosSchedule
from orchestrator.checkpoint.commit import committed_checkpoints
from orchestrator.checkpoint.housekeeping import find_debris, mark_invalid, remove_debris
from orchestrator.checkpoint.selection import plan_restore
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage_probe import write_driver_probe
from orchestrator.config import JobConfig
from orchestrator.errors import CheckpointError, PlacementError
from orchestrator.events import EventLog
from orchestrator.goodput import GoodputLedger
from orchestrator.hangs import HangTimeouts, Pace, ProgressWatch
from orchestrator.failures import Action, Failure, FailureKind, Incident, decide, describe
from orchestrator.triage import (Ending, RankResult, preemptions, something_failed, suspects,
                                 triage)
from orchestrator.context import StopMode
from orchestrator.continuation import continuation
from orchestrator.lease import LeaseKeeper, RunLease
from orchestrator.messages import AttemptSpec, WorkerReport
from orchestrator.worker_group import WorkerGroup, WorkerStartError

log = logging.getLogger("orchestrator.driver")

POLL_INTERVAL_S = 0.25
"""How often RUNNING checks the gang. A death surfaces on the run refs at once; this bounds
how stale progress and events may be, and adds at most this much to hang detection."""

PROBE_TIMEOUT_S = 2.0
"""How long a rank suspected gone gets to answer a poll."""

PROGRESS_EVERY_S = 2.0
"""How often rank 0's step and metrics go to the log and events.jsonl."""

SUMMARY_PATIENCE_S = 120.0
"""How long the end of a job waits for storage to take its summary and last events."""

CLUSTER_CHECK_INTERVAL_S = 1.0
"""How often RUNNING asks Ray about draining nodes and free room (elastic growth), and reads
storage for faults sent by `orchestrator chaos` and markers of faults that fired."""

_LOST_KINDS = (FailureKind.WORKER_DIED, FailureKind.NODE_DIED, FailureKind.HANG,
               FailureKind.PREEMPTED)


# --- states: one class each, holding only its own data -----------------------------------


@dataclass(frozen=True)
class Starting:
    attempt: int
    lost: frozenset[int] = frozenset()
    """Ranks whose workers are gone and must be replaced; the others are reused."""
    regroup: bool = False
    """Place the whole gang anew, at the world size the cluster allows now (elastic)."""
    terminal = False


@dataclass(frozen=True)
class Running:
    attempt: int
    results: dict[int, RankResult] = field(default_factory=dict)
    """Ranks whose attempt has ended (successfully, so far)."""
    terminal = False


@dataclass(frozen=True)
class Recovering:
    attempt: int
    lost: frozenset[int] = frozenset()
    delay_s: float = 0.0
    regroup: bool = False
    terminal = False


@dataclass(frozen=True)
class Succeeded:
    terminal = True


@dataclass(frozen=True)
class Failed:
    reason: str
    config_error: bool = False
    """The configuration cannot work on this cluster (the CLI exits 2)."""
    terminal = True


State = Starting | Running | Recovering | Succeeded | Failed


@dataclass
class Attempt:
    """What the driver knows of the attempt in flight; each start makes a new one."""

    number: int
    progress: ProgressWatch
    """The ranks of this attempt and when each last made progress (hang detection)."""
    next_cluster_check: float = 0.0
    stop_requested: set[int] = field(default_factory=set)
    """Ranks asked to stop after a checkpoint in this attempt (each is asked once)."""
    awaiting_first_step: bool = True
    """Whether this attempt's first finished step is still to be logged (the end of a
    recovery, as far as users are concerned)."""
    span: tuple[float, float] | None = None
    """Monotonic times at which the first and the latest step of this attempt were seen."""

    @property
    def ranks(self) -> set[int]:
        return self.progress.ranks


@dataclass(frozen=True)
class JobResult:
    succeeded: bool
    message: str
    summary: dict
    config_error: bool = False
    """It failed because of its configuration, found only once the workers ran (exit 2)."""


class Driver:
    def __init__(self, config: JobConfig, group: WorkerGroup, layout: RunLayout,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic,
                 lease: RunLease | None = None) -> None:
        """`clock` stamps events; `monotonic` times deadlines and hangs; `sleep` waits out
        back-offs. Unit tests replace all three. `lease`: the run's lease, already acquired
        (the CLI takes it before anything starts); None runs without one (tests that drive
        the loop in-process)."""
        self._config = config
        self._lease = lease
        self._keeper: LeaseKeeper | None = None
        self.job_id = ""
        self._group = group
        self._layout = layout
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self.events = EventLog(layout, clock)
        self.state: State = Starting(attempt=0)
        self.incidents: list[Incident] = []
        self.goodput = GoodputLedger()
        """Where the job's time went, from its events (summary.json, the progress display)."""
        self._history = self.events.events()
        """The run's stored events, read once: the goodput ledger and the continuation."""
        for event in self._history:  # a continued job counts from its first start
            self.goodput.add(event)
        self.events.subscribe(self.goodput.add)  # first: watchers read it
        self._span: dict | None = None
        """Rank 0's steps since the last progress event: {first, last, busy_s, start, end}."""
        self._last_step: dict[int, int] = {}
        self._hang_timeouts = HangTimeouts.of(config.failure)
        self._pace = Pace()
        """How long steps and saves took in this run, for hang detection (kept across
        attempts)."""
        self._attempt = Attempt(number=0, awaiting_first_step=False, progress=ProgressWatch(
            range(0), monotonic(), self._hang_timeouts, self._pace))
        self._next_progress_log = 0.0
        self._committed_by_this_job = False
        """Whether a checkpoint_committed event came from this job: from then on restarts
        resume from the latest checkpoint, whatever `checkpoint.restore` says."""
        self._reported_invalid: set[int] = set()
        self._chaos = ChaosSchedule(
            FaultPlan.from_config(config.chaos).faults(config.scaling.num_workers), layout,
            started_at=clock())

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> JobResult:
        history = self._history
        carried = continuation(history)
        self.job_id = carried.job_id or uuid.uuid4().hex[:12]
        generation = self._lease.generation if self._lease else 0
        self.events.emit("job_start", run=self._config.run.name, job_id=self.job_id,
                         resumed=bool(history), continuing=carried.continuing,
                         lease_generation=generation, config=self._config.to_dict())
        if self._lease is not None and self._lease.took_over is not None:
            self.events.emit("lease_taken_over", generation=generation,
                             previous_holder=asdict(self._lease.took_over.holder),
                             previous_expired=self._lease.took_over.expires_at <= self._clock())
        if carried.continuing:
            # The previous driver of this job died: continue the job, do not start it again.
            self.incidents = list(carried.incidents)
            self._committed_by_this_job = carried.committed
            self.state = Starting(attempt=carried.next_attempt)
            self.events.emit("driver_resumed", attempt=carried.next_attempt,
                             failures_so_far=sum(len(i.failures) for i in self.incidents),
                             committed_by_this_job=carried.committed)
        if carried.started_at:
            self._chaos.started_at = carried.started_at  # chaos times count from the job's start
        if self._chaos.faults:
            self.events.emit("fault_planned", faults=[f.to_event() for f in self._chaos.faults])
        if self._lease is not None:
            self._keeper = LeaseKeeper(self._lease, self._config.run.lease_timeout_s)
        try:
            while not self.state.terminal:
                self.step()
        finally:
            self._group.shutdown()
        if self._keeper is not None and self._keeper.lost:
            self._keeper.close(release=False)
            return JobResult(succeeded=False, message=self.state.reason,
                             summary=self._summary(succeeded=False))
        result = self._finish()
        if self._keeper is not None:
            self._keeper.close(release=True)
        return result

    def step(self) -> None:
        """Carry out the current state once; its handler says which state comes next."""
        if self._keeper is not None and self._keeper.check():
            # Another driver has the run now: this one's workers can no longer commit, and
            # it must not write anything more into the run (not even the end of it, nor
            # this transition).
            log.error("%s: this driver stops", self._keeper.lost)
            self.state = Failed(reason=f"{self._keeper.lost}: this driver stops")
            return
        handler = {Starting: self._start, Running: self._watch, Recovering: self._recover}
        self._set_state(handler[type(self.state)](self.state))

    def _set_state(self, new: State) -> None:
        if type(new) is type(self.state):  # RUNNING goes on (with the ranks ended so far)
            self.state = new
            return
        log.info("%s -> %s", type(self.state).__name__, type(new).__name__)
        if isinstance(self.state, Running):
            self._emit_progress()  # the attempt's last steps, before what ended it
        self.events.emit("state", prev=type(self.state).__name__.upper(),
                         next=type(new).__name__.upper())
        self.state = new

    # --- STARTING --------------------------------------------------------------------------

    def _start(self, state: Starting) -> State:
        if state.attempt == 0:
            self._collect_garbage()
        candidates, rejected = committed_checkpoints(self._layout)
        for r in rejected:
            if r.unreadable:  # a failed read proves nothing: said, never marked
                self.events.emit("checkpoint_unreadable", step=r.step, problems=[r.reason])
                continue
            if r.step not in self._reported_invalid:
                self._reported_invalid.add(r.step)
                self.events.emit("checkpoint_invalid", step=r.step, problems=[r.reason])
            if r.proven_bad:
                mark_invalid(self._layout, r.step, [r.reason])
        # Storage says so too: a manifest this job wrote (its event may have been lost with
        # a driver that died right after the commit).
        self._committed_by_this_job |= bool(self.job_id) and any(
            c.manifest.job_id == self.job_id for c in candidates)
        try:
            plan = plan_restore(self._config.checkpoint, candidates, rejected,
                                self._layout.storage.url_of(self._layout.run_name),
                                committed_by_this_job=self._committed_by_this_job)
        except CheckpointError as e:
            return Failed(reason=str(e))
        from_step = plan.candidates[0] if plan.candidates else 0
        if state.attempt > 0:
            # from_step: the storage checkpoint; the workers may resume from a newer step of
            # the memory tier (their memory_restored event says which).
            self.events.emit("restart", attempt=state.attempt, from_step=from_step,
                             replaced_ranks=sorted(state.lost))
            log.warning("attempt %d: %s, resuming from %s%s", state.attempt,
                        f"replacing rank(s) {','.join(map(str, sorted(state.lost)))}"
                        if state.lost else "restarting the gang",
                        "the memory tier if the gang still holds every rank's state, else "
                        if self._config.checkpoint.memory_interval_steps else "",
                        f"the checkpoint of step {from_step}" if from_step else "the start")
        try:
            if state.regroup:
                self._group.shutdown()
            infos = self._group.form(set(state.lost))
        except PlacementError as e:
            return Failed(reason=str(e))
        except WorkerStartError as e:
            return self._on_incident(state.attempt, [Failure(
                kind=FailureKind.START_FAILED, rank=-1, step=from_step, message=str(e),
                attempt=state.attempt)])
        self.events.emit("workers_started", attempt=state.attempt,
                         workers=[{"rank": r, "node_id": i.node_id, "pid": i.pid}
                                  for r, i in enumerate(infos)],
                         ranks_from_spares=self._group.ranks_from_spares(),
                         ranks_from_standbys=self._group.ranks_from_standbys())
        cfg = self._config
        self._group.launch(AttemptSpec(
            attempt=state.attempt, entrypoint=cfg.workload.entrypoint, args=cfg.workload.args,
            storage_url=cfg.run.storage_url, run_name=cfg.run.name,
            parallelism=str(cfg.workload.args.get("parallelism", "ddp")),
            checkpoint=cfg.checkpoint, restore=plan,
            faults=self._faults_for_attempt(), job_id=self.job_id,
            fencing_token=self._lease.generation if self._lease else 0,
            storage_probe=write_driver_probe(self._layout)))
        now = self._monotonic()
        self._attempt = Attempt(number=state.attempt, next_cluster_check=now,
                                progress=ProgressWatch(range(len(infos)), now,
                                                       self._hang_timeouts, self._pace))
        if len(infos) != cfg.scaling.num_workers:
            self.events.emit("elastic_world_size", world_size=len(infos),
                             num_workers=cfg.scaling.num_workers)
        return Running(attempt=state.attempt)

    def _collect_garbage(self) -> None:
        """Debris of interrupted saves goes at job start, when no save can be in flight: the
        previous driver's workers are gone (they die with it). Checkpoints marked invalid
        stay, for inspection: only `orchestrator ckpt gc` removes them."""
        debris = find_debris(self._layout, include_invalid=False)
        if debris:
            remove_debris(self._layout, debris)
            self.events.emit("checkpoint_debris_removed",
                             paths=["/".join(d.parts[1:]) for d in debris],
                             reasons=[d.reason for d in debris])

    # --- RUNNING ---------------------------------------------------------------------------

    def _watch(self, state: Running) -> State:
        results = dict(state.results)
        for r in self._group.wait(POLL_INTERVAL_S):
            results[r.rank] = r
        self._absorb(self._group.poll(POLL_INTERVAL_S))
        hangs = self._attempt.progress.hung(set(results), self._monotonic())
        if hangs:
            self.events.emit("hang_detected", ranks=sorted(h.rank for h in hangs),
                             hang_timeout_s=round(max(h.timeout_s for h in hangs), 2),
                             hangs=[{"rank": h.rank, "doing": h.doing.value,
                                     "stalled_s": round(h.stalled_s, 2),
                                     "timeout_s": round(h.timeout_s, 2), "why": h.why}
                                    for h in hangs])
            self._group.kill({h.rank for h in hangs})
        if something_failed(results, hangs):
            self._collect_rest(results)
            return self._on_incident(state.attempt,
                                     triage(results, hangs, self._last_step, state.attempt))
        if len(results) == len(self._attempt.ranks):
            if any(r.ending is not Ending.FINISHED for r in results.values()):
                return self._on_stopped(state.attempt, results)
            return Succeeded()
        self._check_cluster()
        return replace(state, results=results)

    def _check_cluster(self) -> None:
        """Once a second: pass preemption notices of draining nodes on to their ranks, and
        when the gang runs below num_workers and room is back, ask it to stop at the next
        checkpoint so it can grow."""
        now = self._monotonic()
        if now < self._attempt.next_cluster_check:
            return
        self._attempt.next_cluster_check = now + CLUSTER_CHECK_INTERVAL_S
        self._run_chaos()
        attempt = self._attempt
        draining = self._group.draining_ranks() - attempt.stop_requested
        if draining:
            self.events.emit("preemption_notice", ranks=sorted(draining), source="node drain")
            self._group.request_stop(draining, StopMode.NOW, "preemption notice: node draining")
            attempt.stop_requested |= draining
        if not attempt.stop_requested and self._group.missing_workers_placeable():
            ranks = attempt.ranks
            self.events.emit("grow_requested", num_workers=self._config.scaling.num_workers)
            self._group.request_stop(ranks, StopMode.AT_CHECKPOINT,
                                     "resources are back: growing to scaling.num_workers")
            attempt.stop_requested |= ranks

    # --- chaos: faults injected on purpose (orchestrator/chaos/) ----------------------------

    def _faults_for_attempt(self) -> list[Fault]:
        self._report_chaos()
        out = []
        for fault in self._chaos.for_attempt(self._clock()):
            if fault.kind == "kill_node" and (why := self._group.cannot_kill_node(fault.rank)):
                self._skip(fault, why)
                continue
            out.append(fault)
        return out

    def _skip(self, fault: Fault, why: str) -> None:
        self._chaos.skip(fault)
        self.events.emit("fault_skipped", **fault.to_event(), reason=why)
        log.warning("chaos: %s skipped: %s", fault.id, why)

    def _report_chaos(self) -> None:
        for kind, fields in self._chaos.refresh():
            self.events.emit(kind, **fields)
            if kind == "fault_fired":
                log.warning("chaos: %s fired (%s)", fields.get("fault_id"),
                            fields.get("source", "?"))

    def _run_chaos(self) -> None:
        """Once a second while RUNNING: report what fired, carry out what is due."""
        self._report_chaos()
        gang_step = max(self._last_step.values(), default=0)
        for fault in self._chaos.due(self._clock(), gang_step):
            self._carry_out(fault, gang_step)

    def _carry_out(self, fault: Fault, gang_step: int) -> None:
        world = len(self._attempt.ranks)
        if fault.kind != "kill_driver" and fault.rank >= world:
            why = f"rank {fault.rank} is not in the gang of {world}"
        elif fault.kind == "kill_node":
            why = self._group.cannot_kill_node(fault.rank)
        elif fault.kind == "drain":
            why = self._group.drain_node(fault.rank)
        else:
            why = ""
        if why:
            self._skip(fault, why)
            return
        if not fault.by_driver:
            self._group.inject(fault.rank, fault)
            return
        write_marker(self._layout, fault, rank=fault.rank, step=gang_step,
                     attempt=self._attempt.number)
        if fault.kind == "kill_driver":
            self.events.emit("fault_fired", **fault.to_event(), step=gang_step,
                             pid=os.getpid())
            self.events.flush()
            log.warning("chaos: %s: this driver kills itself (SIGKILL)", fault.id)
            os.kill(os.getpid(), signal.SIGKILL)

    def _on_stopped(self, attempt: int, results: dict[int, RankResult]) -> State:
        """The gang checkpointed and stopped on request: a preemption (the noticed ranks'
        workers are about to go, and are replaced) or a resize (placed anew)."""
        noticed = preemptions(results, attempt)
        if noticed:
            return self._on_incident(attempt, noticed)
        self.events.emit("resize", from_world_size=len(results),
                         to_num_workers=self._config.scaling.num_workers)
        return Recovering(attempt=attempt, regroup=True)

    def _collect_rest(self, results: dict[int, RankResult]) -> None:
        """What the group can still tell before triage: give the root cause a moment to
        surface (a killed rank's peers fail about a second later with echo errors, and vice
        versa), then probe the ranks that only a probe can show gone."""
        deadline = self._monotonic() + self._config.failure.failure_grace_s
        while len(results) < len(self._attempt.ranks) and self._monotonic() < deadline:
            for r in self._group.wait(max(deadline - self._monotonic(), 0.01)):
                results[r.rank] = r
        self._absorb(self._group.poll(POLL_INTERVAL_S))
        probe = suspects(results, self._attempt.ranks)
        if probe:
            for r in self._group.probe(probe, PROBE_TIMEOUT_S):
                results[r.rank] = r

    def _absorb(self, reports: list[WorkerReport]) -> None:
        now = self._monotonic()
        for report in reports:
            self._attempt.progress.saw(report.rank, report.progress_seq, now, report.doing,
                               report.slowest_s)
            self._last_step[report.rank] = max(self._last_step.get(report.rank, 0), report.step)
            for event in report.events:
                kind = event.pop("kind")
                self.events.emit(kind, rank=report.rank, **event)
                if kind == "checkpoint_committed":
                    self._committed_by_this_job = True
                if report.rank == 0:
                    _say_where_resumed(kind, event)
            if report.rank == 0 and report.step_durations:
                attempt = self._attempt
                attempt.span = (attempt.span or (now, now))[0], now
                self._add_to_span(report)
                if attempt.awaiting_first_step:
                    attempt.awaiting_first_step = False
                    step, _, end_time = report.step_durations[0]
                    self.events.emit("first_step", attempt=attempt.number, step=step,
                                     step_end_time=round(end_time, 3))
                    # Only now: a spare or standby importing torch would slow the start.
                    self._group.warm_up_replacements()
                if now >= self._next_progress_log:
                    self._next_progress_log = now + PROGRESS_EVERY_S
                    self._emit_progress()

    def _add_to_span(self, report: WorkerReport) -> None:
        first_step, first_s, first_end = report.step_durations[0]
        span = self._span or {"first": first_step, "last": first_step, "busy_s": 0.0,
                              "start": first_end - first_s, "end": first_end}
        for step, duration_s, end_time in report.step_durations:
            span["last"], span["end"] = step, end_time
            span["busy_s"] += duration_s
        span["metrics"] = report.metrics
        self._span = span

    def _emit_progress(self) -> None:
        """Rank 0's steps since the last progress event, with its latest metrics: what the
        progress display, the metrics and the goodput ledger read."""
        span, self._span = self._span, None
        if span is None:
            return
        metrics = span.pop("metrics")
        self.events.emit("progress", attempt=self._attempt.number, step=span["last"],
                         metrics=metrics, span={k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in span.items()})

    def _on_incident(self, attempt: int, failures: list[Failure]) -> State:
        self._emit_progress()  # the steps before the failure come first in the log
        first, last = self._attempt.span or (0.0, 0.0)
        progress_s = last - first
        self.incidents.append(Incident(attempt=attempt, failures=tuple(failures),
                                       progress_s=progress_s))
        for f in failures:
            self.events.emit("failure", **f.to_event())
        decision = decide(self.incidents, self._config.failure)
        log.warning("attempt %d failed: %s -> %s", attempt, decision.reason,
                    decision.action.value)
        self.events.emit("decision", action=decision.action.value, reason=decision.reason,
                         delay_s=decision.delay_s, attempt=attempt,
                         progress_s=round(progress_s, 3))
        if decision.action is Action.STOP:
            return Failed(reason=self._stop_message(decision.reason),
                          config_error=decision.config_error)
        lost = frozenset(f.rank for f in failures if f.kind in _LOST_KINDS)
        return Recovering(attempt=attempt, lost=lost, delay_s=decision.delay_s,
                          regroup=self._below_full_size())

    def _below_full_size(self) -> bool:
        """An elastic gang is placed anew after a failure, to grow back if it can."""
        return 0 < len(self._attempt.ranks) < self._config.scaling.num_workers

    def _stop_message(self, reason: str) -> str:
        lines = [f"job stopped: {reason}", "failures:"]
        lines += [f"  attempt {i.attempt}: {describe(list(i.failures))}" for i in self.incidents]
        return "\n".join(lines)

    # --- RECOVERING ------------------------------------------------------------------------

    def _recover(self, state: Recovering) -> State:
        if state.delay_s > 0:
            self._sleep(state.delay_s)
        return Starting(attempt=state.attempt + 1, lost=state.lost, regroup=state.regroup)

    # --- the end ---------------------------------------------------------------------------

    def _summary(self, succeeded: bool) -> dict:
        candidates, _ = committed_checkpoints(self._layout)
        return {
            "status": "succeeded" if succeeded else "failed",
            **self.goodput.breakdown(self._clock()).to_summary(),
            "restarts": sum(1 for e in self.events.events("restart")),
            "failures": [f.to_event() for i in self.incidents for f in i.failures],
            "final_checkpoint_step": candidates[0].step if candidates else None,
        }

    def _finish(self) -> JobResult:
        succeeded = isinstance(self.state, Succeeded)
        summary = self._summary(succeeded)
        message = "job succeeded" if succeeded else self.state.reason
        if not succeeded:
            summary["error"] = message
        self.events.emit("job_end", status=summary["status"], message=message.splitlines()[0])
        self._write_when_storage_answers(json.dumps(summary, indent=1).encode())
        return JobResult(succeeded=succeeded, message=message, summary=summary,
                         config_error=isinstance(self.state, Failed) and self.state.config_error)

    def _write_when_storage_answers(self, summary: bytes) -> None:
        """The summary and the rest of the event log, retried (storage may be away for a
        while) for up to SUMMARY_PATIENCE_S: the job's outcome is known and must not be
        lost to a storage hiccup, nor turn into a driver crash."""
        deadline = self._monotonic() + SUMMARY_PATIENCE_S
        delay = 0.5
        while True:
            try:
                self._layout.storage.write_atomic(summary, *self._layout.summary)
                if self.events.flush():
                    return
                error = "the event log"
            except Exception as e:  # noqa: BLE001 -- reported, then retried
                error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or str(e)[:200]}"
            if self._monotonic() + delay > deadline:
                log.error("the run's summary or event log could not be written (%s); the "
                          "outcome is in this log only", error)
                return
            log.warning("writing the run's summary failed (%s); retrying in %.1f s", error,
                        delay)
            self._sleep(delay)
            delay = min(delay * 2, 10.0)


def _say_where_resumed(kind: str, event: dict[str, Any]) -> None:
    """The restart line could only say "the memory tier if ..., else the checkpoint of step
    N"; rank 0's restore event says which it was, and the user reads it here (a worker's own
    log lines do not reach a job's log)."""
    if kind == "memory_restored":
        sources = ", ".join(
            f"rank {s.get('rank')}: " + ("own" if s.get("holder") == s.get("rank")
                                          else f"buddy copy on rank {s.get('holder')}")
            for s in event.get("sources") or [] if isinstance(s, dict))
        log.info("resumed from the memory tier at step %s (%s)", event.get("step"), sources)
    elif kind == "memory_restore_skipped":
        log.warning("memory tier not used: %s; restoring from storage", event.get("reason"))
    elif kind == "checkpoint_restored":
        log.info("resumed from the checkpoint of step %s", event.get("step"))

