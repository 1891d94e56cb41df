"""The driver's state machine, stepped one transition at a time against a fake worker group.

No Ray here: the fake scripts what each attempt's ranks do. Storage is in memory.
"""

from __future__ import annotations

import json
import uuid

import pytest

from orchestrator.chaos import FaultPlan
from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import Manifest
from orchestrator.checkpoint.storage import Storage
from orchestrator.driver import Driver, Failed, Recovering, Running, Starting, Succeeded
from orchestrator.errors import PlacementError
from orchestrator.triage import Ending, RankResult
from orchestrator.messages import WorkerInfo, WorkerReport
from orchestrator.worker_group import WorkerStartError
from tests.helpers import make_config


class FakeGroup:
    """Each attempt is a list of batches that successive wait() calls return."""

    def __init__(self, attempts: list[list[list[RankResult]]], start_errors=None) -> None:
        self.attempts = attempts
        self.start_errors = list(start_errors or [])
        self.launched = []
        self.reports: list[WorkerReport] = []
        self.shutdowns = 0
        self.formed: list[set[int]] = []
        self.killed: set[int] = set()
        self.answering_probe: set[int] = set()
        self.stop_requests: list = []
        self.draining: set[int] = set()
        self.can_grow = False
        self.injected: list = []
        self.drained: list[int] = []
        self._batches: list[list[RankResult]] = []

    def form(self, lost_ranks):
        self.formed.append(set(lost_ranks))
        if self.start_errors:
            error = self.start_errors.pop(0)
            if error:
                raise error
        return [WorkerInfo(node_id="n", node_ip="127.0.0.1", pid=100 + r) for r in range(2)]

    def launch(self, spec):
        self.launched.append(spec)
        self._batches = list(self.attempts[len(self.launched) - 1])

    def wait(self, timeout_s):
        return self._batches.pop(0) if self._batches else []

    def poll(self, timeout_s):
        reports, self.reports = self.reports, []
        return reports

    def probe(self, ranks, timeout_s):
        return [RankResult(rank=r, step=-1, ending=Ending.NODE_DIED,
                           message="its node left the cluster") for r in sorted(ranks)
                if r not in self.answering_probe]

    def ranks_from_spares(self):
        return []

    def ranks_from_standbys(self):
        return []

    def warm_up_replacements(self):
        pass

    def request_stop(self, ranks, mode, reason):
        self.stop_requests.append((set(ranks), int(mode), reason))

    def draining_ranks(self):
        return set(self.draining)

    def missing_workers_placeable(self):
        return self.can_grow

    def kill(self, ranks):
        self.killed |= set(ranks)

    def inject(self, rank, fault):
        self.injected.append((rank, fault))

    def drain_node(self, rank):
        self.drained.append(rank)
        return ""

    def cannot_kill_node(self, rank):
        return ""

    def shutdown(self):
        self.shutdowns += 1


def ok(rank, step=20):
    return RankResult(rank=rank, step=step, ending=Ending.FINISHED)


def died(rank):
    return RankResult(rank=rank, step=-1, ending=Ending.DIED, message="actor died")


def raised(rank, step=12):
    return RankResult(rank=rank, step=step, ending=Ending.RAISED, message="ValueError: bad",
                      traceback="tb")


@pytest.fixture
def layout():
    return RunLayout(Storage(f"memory://driver-{uuid.uuid4().hex}"), "run")


def config_for(layout, **failure):
    return make_config(layout.storage.url, "run", failure={"failure_grace_s": 0.01, **failure},
                       chaos=FaultPlan().kill_at(rank=1, step=12).config())


def commit_step(layout, step):
    layout.storage.write_atomic(b"shard", *layout.data_dir(step, "save-a"), "__0_0.distcp")
    files = commit.checksum_files(layout, step, "save-a", ["__0_0.distcp"])
    commit.write_manifest(layout, Manifest(step=step, world_size=2, parallelism="ddp",
                                           files=files, data_dir="save-a"))


def kinds(driver):
    return [e["kind"] for e in driver.events.events() if e["kind"] not in ("state", "progress")]


def test_happy_path_one_transition_at_a_time(layout):
    group = FakeGroup([[[], [ok(0)], [ok(1)]]])
    driver = Driver(config_for(layout), group, layout)
    assert driver.state == Starting(attempt=0)

    driver.step()
    assert isinstance(driver.state, Running) and driver.state.attempt == 0
    spec = group.launched[0]
    assert spec.restore.candidates == [] and spec.attempt == 0
    assert [f.id for f in spec.faults] == ["kill-rank1-step12"]

    driver.step()  # nothing ended yet
    assert isinstance(driver.state, Running)
    driver.step()  # rank 0 done, rank 1 still running
    assert isinstance(driver.state, Running) and set(driver.state.results) == {0}
    driver.step()
    assert driver.state == Succeeded()


# --- each state's handler returns the next state; step() is the one place that sets it -----


def test_starting_returns_running_and_makes_a_new_attempt(layout):
    group = FakeGroup([[[]]])
    driver = Driver(config_for(layout), group, layout)
    nxt = driver._start(Starting(attempt=0))
    assert nxt == Running(attempt=0)
    assert driver.state == Starting(attempt=0)  # the handler does not set it
    assert driver._attempt.number == 0 and driver._attempt.ranks == {0, 1}
    assert driver._attempt.awaiting_first_step and driver._attempt.stop_requested == set()


def test_running_returns_itself_with_the_ranks_ended_so_far_then_the_outcome(layout):
    group = FakeGroup([[[ok(0)], [died(1)]]])
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    nxt = driver._watch(driver.state)
    assert nxt == Running(attempt=0, results={0: ok(0)}) and driver.state == Running(attempt=0)
    nxt = driver._watch(nxt)
    assert nxt == Recovering(attempt=0, lost=frozenset({1}))
    assert isinstance(driver.state, Running)


def test_recovering_waits_out_the_back_off_and_returns_the_next_attempt(layout):
    sleeps = []
    driver = Driver(config_for(layout), FakeGroup([]), layout, sleep=sleeps.append)
    nxt = driver._recover(Recovering(attempt=2, lost=frozenset({1}), delay_s=1.5, regroup=True))
    assert nxt == Starting(attempt=3, lost=frozenset({1}), regroup=True) and sleeps == [1.5]


def test_a_new_attempt_forgets_the_last_ones_stop_requests_and_first_step(layout):
    group = FakeGroup([[[], [died(1)]], [[]]])
    group.draining = {0}
    ticks = iter(range(10**6))
    driver = Driver(config_for(layout), group, layout, monotonic=lambda: next(ticks) / 1000)
    driver.step()
    driver.step()  # the drain notice goes to rank 0
    assert driver._attempt.stop_requested == {0}
    driver.step()  # rank 1 died
    driver.step()  # RECOVERING -> STARTING
    group.draining = set()
    driver.step()
    assert driver._attempt.number == 1 and driver._attempt.stop_requested == set()
    assert driver._attempt.awaiting_first_step


def test_worker_death_recovers_from_the_latest_committed_checkpoint(layout):
    commit_step(layout, 5)
    commit_step(layout, 10)
    layout.storage.write_atomic(b"x", *layout.step_dir(15), "__0_0.distcp")  # no manifest
    group = FakeGroup([[[died(1)]], [[ok(0), ok(1)]]])
    group.reports = [WorkerReport(rank=0, step=12, metrics={}, progress_seq=1,
                                  step_durations=[(12, 0.1, 0.0)], events=[])]
    driver = Driver(config_for(layout), group, layout)

    driver.step()  # STARTING -> RUNNING
    assert group.launched[0].restore.candidates == [10, 5]
    driver.step()  # the death surfaces
    assert driver.state == Recovering(attempt=0, lost=frozenset({1}))
    (failure,) = driver.incidents[0].failures
    assert (failure.kind.value, failure.rank, failure.step) == ("worker_died", 1, 12)

    driver.step()  # RECOVERING -> STARTING; only the lost rank will be replaced
    assert driver.state == Starting(attempt=1, lost=frozenset({1}))
    # The kill fired (the worker wrote its marker before dying): not handed out again.
    layout.storage.write_atomic(b"", *layout.chaos, "kill-rank1-step12")
    driver.step()
    assert isinstance(driver.state, Running) and group.launched[1].faults == []
    assert group.formed == [set(), {1}] and group.shutdowns == 0
    assert driver.events.events("restart") [0]["from_step"] == 10
    driver.step()
    assert driver.state == Succeeded()
    # Step 15's folder (no manifest) is debris, removed at job start.
    assert kinds(driver) == ["checkpoint_debris_removed", "workers_started", "first_step",
                             "failure", "decision", "restart", "workers_started", "fault_fired"]
    assert not layout.storage.exists(*layout.step_dir(15))


def test_restart_budget_exhausted_fails_with_every_failure_listed(layout):
    group = FakeGroup([[[raised(1)]], [[raised(0, step=14)]]])
    driver = Driver(config_for(layout, max_user_errors=1), group, layout, sleep=lambda s: None)
    result = driver.run()

    assert not result.succeeded and isinstance(driver.state, Failed)
    assert "failure.max_user_errors=1" in result.message
    assert "attempt 0: rank 1: user_error: ValueError: bad" in result.message
    assert "attempt 1: rank 0: user_error: ValueError: bad" in result.message
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["status"] == "failed" and summary["restarts"] == 1
    assert [(f["rank"], f["step"]) for f in summary["failures"]] == [(1, 12), (0, 14)]
    assert group.formed == [set(), set()]  # a user error replaces nobody
    assert group.shutdowns == 1


def test_a_rank_that_fails_while_its_peer_hangs_is_decided_after_the_grace_period(layout):
    group = FakeGroup([[[raised(1)]], [[ok(0), ok(1)]]])  # rank 0 never ends attempt 0
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    driver.step()
    assert driver.state == Recovering(attempt=0)
    assert [f.rank for f in driver.incidents[0].failures] == [1]


def test_placement_failure_stops_the_job(layout):
    group = FakeGroup([], start_errors=[PlacementError("cannot place 2 workers")])
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    assert driver.state == Failed(reason="cannot place 2 workers")


def test_a_failed_rendezvous_is_a_failure_that_is_retried(layout):
    group = FakeGroup([[[ok(0), ok(1)]]], start_errors=[WorkerStartError("timeout"), None])
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    assert driver.state == Recovering(attempt=0)
    assert driver.incidents[0].failures[0].kind.value == "start_failed"
    driver.step()
    driver.step()
    assert isinstance(driver.state, Running) and driver.state.attempt == 1


def test_worker_events_land_in_the_log_and_the_summary_counts_lost_steps(layout):
    group = FakeGroup([[[died(1)]], [[ok(0, 20), ok(1, 20)]]])
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    group.reports = [WorkerReport(
        rank=0, step=7, metrics={"loss": 1.0}, progress_seq=1,
        step_durations=[(s, 0.1, 0.0) for s in range(1, 8)],
        events=[{"kind": "checkpoint_committed", "step": 5, "bytes": 10}])]
    commit_step(layout, 5)
    driver.step()
    driver.step()
    driver.step()
    group.reports = [WorkerReport(rank=0, step=20, metrics={}, progress_seq=2,
                                  step_durations=[(s, 0.1, 0.0) for s in range(6, 21)],
                                  events=[{"kind": "checkpoint_restored", "step": 5}])]
    result = driver.run()
    assert result.succeeded
    assert result.summary["lost_steps"] == 2  # steps 6 and 7 were computed twice
    assert result.summary["steps_completed"] == 20
    committed = driver.events.events("checkpoint_committed")
    assert committed[0]["rank"] == 0 and committed[0]["step"] == 5


class ClockedGroup(FakeGroup):
    """A fake whose wait() lets simulated time pass, for hang detection."""

    def __init__(self, attempts, **kw) -> None:
        super().__init__(attempts, **kw)
        self.now = 1000.0
        self.answering: set[int] = {0, 1}
        self.seq = {0: 0, 1: 0}

    def wait(self, timeout_s):
        self.now += timeout_s
        return super().wait(timeout_s)

    def poll(self, timeout_s):
        return [WorkerReport(rank=r, step=self.seq[r], metrics={},
                             progress_seq=self.seq[r], step_durations=[], events=[])
                for r in sorted(self.answering)]


def hang_driver(layout, group, hang_timeout_s=5.0):
    sleeps = []
    driver = Driver(config_for(layout, hang_timeout_s=hang_timeout_s), group, layout,
                    sleep=sleeps.append, monotonic=lambda: group.now)
    return driver, sleeps


def test_a_rank_that_stops_answering_is_the_hung_one_and_only_it_is_killed(layout):
    group = ClockedGroup([[], [[ok(0), ok(1)]]])
    driver, _ = hang_driver(layout, group)
    driver.step()  # STARTING -> RUNNING
    for _ in range(8):  # both ranks progress for 2 s
        group.seq = {0: group.seq[0] + 1, 1: group.seq[1] + 1}
        driver.step()
    group.answering = {0}  # rank 1 is SIGSTOPped; rank 0 waits for it in a collective
    while isinstance(driver.state, Running):
        driver.step()
        assert group.now < 1000 + 2 + 5 + 1, "not detected within hang_timeout_s + 1 s"
    assert group.killed == {1}
    assert driver.state == Recovering(attempt=0, lost=frozenset({1}))
    (failure,) = driver.incidents[0].failures
    assert failure.kind.value == "hang" and "no progress for 5s" in failure.message
    assert driver.events.events("hang_detected")[0]["ranks"] == [1]


def test_when_every_stalled_rank_still_answers_all_are_hung(layout):
    group = ClockedGroup([[], [[ok(0), ok(1)]]])
    driver, _ = hang_driver(layout, group)
    driver.step()
    while isinstance(driver.state, Running):  # nobody ever progresses: a deadlock
        driver.step()
    assert group.killed == {0, 1}
    assert {f.kind.value for f in driver.incidents[0].failures} == {"hang"}
    assert driver.state.lost == frozenset({0, 1})


def test_progress_keeps_a_slow_rank_alive(layout):
    group = ClockedGroup([[], [[ok(0), ok(1)]]])
    driver, _ = hang_driver(layout, group, hang_timeout_s=2.0)
    driver.step()
    for _ in range(100):  # 25 s of simulated time, a step every 1.75 s
        if int(group.now * 4) % 7 == 0:
            group.seq = {0: group.seq[0] + 1, 1: group.seq[1] + 1}
        driver.step()
    assert isinstance(driver.state, Running) and group.killed == set()


def test_restarts_in_a_row_back_off(layout):
    group = FakeGroup([[[died(1)]], [[died(0)]], [[died(1)]], [[ok(0), ok(1)]]])
    sleeps = []
    config = config_for(layout, backoff_initial_s=1.5, backoff_multiplier=2.0)
    result = Driver(config, group, layout, sleep=sleeps.append).run()
    assert result.succeeded
    assert sleeps == [1.5, 3.0]  # the first restart goes at once
    assert [e["delay_s"] for e in Driver(config, group, layout).events.events("decision")] == [
        0.0, 1.5, 3.0]


def test_peer_echoes_lead_to_the_rank_that_no_longer_answers(layout):
    echo = RankResult(rank=0, step=9, ending=Ending.RAISED,
                      message="RuntimeError: Connection closed by peer")
    group = FakeGroup([[[echo]], [[ok(0), ok(1)]]])  # rank 1 never reports: its node is gone
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    driver.step()
    assert driver.state == Recovering(attempt=0, lost=frozenset({1}))
    (failure,) = driver.incidents[0].failures
    assert (failure.kind.value, failure.rank) == ("node_died", 1)


def stopped(rank, step=13, notice=False, reason="preemption notice: SIGTERM"):
    return RankResult(rank=rank, step=step, ending=Ending.NOTICED if notice else Ending.STOPPED,
                      message=reason)


def test_a_preemption_notice_is_an_infrastructure_failure_replacing_the_noticed_rank(layout):
    group = FakeGroup([[[stopped(0), stopped(1, notice=True)]], [[ok(0), ok(1)]]])
    driver = Driver(config_for(layout), group, layout)
    driver.step()
    driver.step()
    assert driver.state == Recovering(attempt=0, lost=frozenset({1}))
    (failure,) = driver.incidents[0].failures
    assert (failure.kind.value, failure.rank, failure.step) == ("preempted", 1, 13)


def test_draining_nodes_get_the_notice_once(layout):
    group = FakeGroup([[[], [], [], []]])
    group.draining = {1}
    now = [0.0]
    driver = Driver(config_for(layout), group, layout, monotonic=lambda: now[0])
    driver.step()
    for _ in range(3):
        now[0] += 2.0
        driver.step()
    assert group.stop_requests == [({1}, 2, "preemption notice: node draining")]
    assert driver.events.events("preemption_notice")[0]["ranks"] == [1]


def test_room_for_missing_workers_asks_for_a_stop_at_the_next_checkpoint_then_regroups(layout):
    group = FakeGroup([[[], [stopped(0, reason="grow"), stopped(1, reason="grow")]],
                       [[ok(0), ok(1)]]])
    group.can_grow = True
    driver = Driver(make_config(layout.storage.url, "run", scaling={"num_workers": 3,
                                                                    "min_workers": 2}),
                    group, layout)
    driver.step()  # FakeGroup forms 2 workers: below num_workers=3
    assert driver.events.events("elastic_world_size")[0]["world_size"] == 2
    driver.step()
    assert group.stop_requests == [({0, 1}, 1, "resources are back: growing to "
                                                "scaling.num_workers")]
    driver.step()  # both stopped after their checkpoint
    assert driver.state == Recovering(attempt=0, regroup=True) and driver.incidents == []
    driver.step()
    driver.step()
    assert group.shutdowns == 1  # placed anew, at the size the cluster allows now


def test_the_driver_never_deletes_a_checkpoint_and_marks_only_proven_bad_ones(layout):
    from orchestrator.checkpoint.housekeeping import mark_invalid

    for step in (5, 10, 15, 20):
        commit_step(layout, step)
    mark_invalid(layout, 5, ["a checksum mismatch found earlier"])
    layout.storage.write_atomic(b"{torn", *layout.manifest(15))  # read whole: proof
    real_cat = layout.storage.fs.cat_file

    def cat_file(path, *args, **kwargs):  # reading step 20's manifest fails, every time
        if "step_000000020/manifest" in path:
            raise TimeoutError("injected: read timed out")
        return real_cat(path, *args, **kwargs)

    layout.storage.fs.cat_file = cat_file
    try:
        driver = Driver(config_for(layout), FakeGroup([[[ok(0), ok(1)]]]), layout)
        driver.step()
    finally:
        layout.storage.fs.cat_file = real_cat
    assert driver.state.attempt == 0 and isinstance(driver.state, Running)
    assert driver._group.launched[0].restore.candidates == [10]
    (unreadable,) = driver.events.events("checkpoint_unreadable")
    assert unreadable["step"] == 20
    assert sorted(e["step"] for e in driver.events.events("checkpoint_invalid")) == [5, 15]
    assert not layout.storage.exists(*layout.invalid_marker(20))  # a timeout proves nothing
    assert layout.storage.exists(*layout.invalid_marker(15))
    for step in (5, 15, 20):  # every one still there, for inspection or a later run
        assert layout.storage.exists(*layout.manifest(step))
    assert not driver.events.events("checkpoint_debris_removed")
