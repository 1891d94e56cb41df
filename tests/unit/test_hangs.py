"""Hang detection is pure: times are passed in. The driver polls every rank about every 0.25 s;
`Rank` below plays a worker's training thread, the loops play the polls."""

import random

import pytest

from orchestrator.config import ConfigError, FailureConfig
from orchestrator.hangs import Activity, HangTimeouts, Pace, ProgressWatch

POLL_S = 0.25
AUTO = HangTimeouts.of(FailureConfig())


def fixed(seconds):
    return HangTimeouts.of(FailureConfig(hang_timeout_s=seconds))


def ranks_of(hangs):
    return {h.rank for h in hangs}


class Rank:
    """A training thread: works through (activity, seconds) in order, bumping its progress
    counter at the end of each and timing it, as context.Reporter does."""

    def __init__(self, work):
        self.work, self.seq, self.started = list(work), 0, 0.0

    def poll(self, now):
        slowest = {}
        while self.work and now - self.started >= self.work[0][1]:
            activity, took = self.work.pop(0)
            self.started += took
            self.seq += 1
            slowest[activity.value] = max(slowest.get(activity.value, 0.0), took)
        return (self.work[0][0] if self.work else Activity.STEP), slowest


def run_polls(watch, ranks, until, start=0.0):
    """Poll every rank every POLL_S up to `until`; the first verdict, or None."""
    now = start
    while now < until:
        now = round(now + POLL_S, 6)
        for r, rank in ranks.items():
            doing, slowest = rank.poll(now)
            watch.saw(r, rank.seq, now, doing, slowest)
        hangs = watch.hung(set(), now)
        if hangs:
            return now, hangs
    return None


def test_no_verdict_before_a_fixed_timeout_and_progress_resets_the_clock():
    watch = ProgressWatch(range(2), now=0.0, timeouts=fixed(10))
    assert watch.hung(set(), now=9.9) == []
    watch.saw(0, 1, now=9.9)
    watch.saw(1, 1, now=9.9)
    assert watch.hung(set(), now=19.0) == []
    assert ranks_of(watch.hung(set(), now=20.0)) == {0, 1}  # answering but stuck: all hung


def test_the_silent_rank_is_the_culprit_and_finished_ranks_never_hang():
    watch = ProgressWatch(range(3), now=0.0, timeouts=fixed(5))
    for t in (2.0, 4.0, 6.0):
        watch.saw(0, 1, now=t)  # answers, no new progress after t=2
    watch.saw(1, 1, now=2.0)  # then silent
    assert ranks_of(watch.hung({2}, now=8.0)) == {1}


def test_auto_is_the_default_and_a_number_keeps_a_fixed_timeout():
    assert FailureConfig().hang_timeout_s == "auto"
    assert (AUTO.factor, AUTO.min_s, AUTO.first_step_s) == (5.0, 10.0, 300.0)
    assert HangTimeouts.of(FailureConfig(hang_timeout_s=7)).limit_s(Activity.STEP, Pace())[0] == 7


@pytest.mark.parametrize("settings, key", [
    ({"hang_timeout_s": "never"}, "failure.hang_timeout_s"),
    ({"hang_timeout_s": 0}, "failure.hang_timeout_s"),
    ({"hang_timeout_s": True}, "failure.hang_timeout_s"),
    ({"hang_factor": 0.5}, "failure.hang_factor"),
    ({"hang_min_s": -1}, "failure.hang_min_s"),
    ({"hang_first_step_s": float("inf")}, "failure.hang_first_step_s"),
])
def test_bad_hang_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FailureConfig(**settings)


def test_auto_learns_the_step_time_and_detects_a_hang_after_five_of_the_slowest():
    # Steps of 4 s, then rank 1 stops (SIGSTOP: it no longer answers); rank 0 waits for it.
    ranks = {0: Rank([(Activity.STEP, 4.0)] * 10 + [(Activity.STEP, 1e9)]),
             1: Rank([(Activity.STEP, 4.0)] * 10 + [(Activity.STEP, 1e9)])}
    watch = ProgressWatch(range(2), now=0.0, timeouts=AUTO)
    now, hangs = run_polls(watch, ranks, until=200)
    # The last progress was at 40 s; the slowest step seen is 4 s.
    assert 40 + 5 * 4.0 < now <= 40 + 5 * 4.0 + 2 * POLL_S
    assert ranks_of(hangs) == {0, 1}  # both still answer: a deadlock, all hung
    assert hangs[0].doing is Activity.STEP and "5 x the slowest step" in hangs[0].why


def test_a_run_of_fast_steps_waits_at_least_hang_min_s():
    ranks = {0: Rank([(Activity.STEP, 0.1)] * 50 + [(Activity.STEP, 1e9)])}
    watch = ProgressWatch(range(1), now=0.0, timeouts=AUTO)
    now, (hang,) = run_polls(watch, ranks, until=100)
    assert hang.timeout_s == 10.0 and "hang_min_s" in hang.why
    assert 5 + 10 < now <= 5 + 10 + 2 * POLL_S


def test_no_false_hang_when_the_step_time_varies_by_three_times():
    rng = random.Random(7)
    # The first steps are the fastest (1 s); later ones anywhere between 1 and 3 s, with a
    # 3 s step right after the shortest -- the worst case for a learned timeout.
    times = [1.0] * 5 + [3.0] + [rng.uniform(1.0, 3.0) for _ in range(200)]
    ranks = {r: Rank([(Activity.STEP, t) for t in times]) for r in range(2)}
    watch = ProgressWatch(range(2), now=0.0, timeouts=HangTimeouts.of(FailureConfig(hang_min_s=1.0)))
    assert run_polls(watch, ranks, until=sum(times) - 1) is None


def test_no_false_hang_on_a_save_ten_times_longer_than_a_step_and_a_hung_save_is_caught():
    step, save = 2.0, 20.0
    work = ([(Activity.STEP, step)] * 10 + [(Activity.SAVE, save)]) * 3
    ranks = {0: Rank(work + [(Activity.SAVE, 1e9)])}  # the 4th save never ends
    watch = ProgressWatch(range(1), now=0.0, timeouts=AUTO)
    end_of_work = sum(t for _, t in work)
    assert run_polls(watch, ranks, until=end_of_work) is None
    # The first save, not timed before, had hang_first_step_s; the later ones 5 x 20 s.
    assert watch.timeouts.limit_s(Activity.SAVE, watch.pace)[0] == 5 * save
    now, (hang,) = run_polls(watch, ranks, until=end_of_work + 200, start=end_of_work)
    assert hang.doing is Activity.SAVE
    assert end_of_work + 5 * save < now <= end_of_work + 5 * save + 2 * POLL_S


def test_a_save_shorter_than_a_poll_is_timed_too():
    # Saves of 0.05 s that no poll sees under way: a later save that hangs is still caught
    # after hang_min_s, not after the allowance for a save never timed.
    work = ([(Activity.STEP, 0.5)] * 4 + [(Activity.SAVE, 0.05)]) * 4
    ranks = {0: Rank(work + [(Activity.SAVE, 1e9)])}
    watch = ProgressWatch(range(1), now=0.0, timeouts=AUTO)
    now, (hang,) = run_polls(watch, ranks, until=400)
    assert hang.doing is Activity.SAVE and hang.timeout_s == 10.0


def test_the_start_of_an_attempt_has_its_own_allowance_and_the_pace_outlives_the_attempt():
    # Start-up, restore and a first step that compiles: 200 s, far beyond 5 x a step.
    ranks = {0: Rank([(Activity.START, 150.0), (Activity.START, 50.0)]
                     + [(Activity.STEP, 1.0)] * 20)}
    watch = ProgressWatch(range(1), now=0.0, timeouts=AUTO)
    assert run_polls(watch, ranks, until=219) is None
    # The next attempt (same pace) hangs in its first step: caught after 5 x the slowest
    # start (150 s), which is longer than hang_first_step_s.
    again = ProgressWatch(range(1), now=0.0, timeouts=AUTO, pace=watch.pace)
    assert again.timeouts.limit_s(Activity.START, again.pace)[0] == pytest.approx(750, abs=2)
    stuck = {0: Rank([(Activity.START, 1e9)])}
    now, (hang,) = run_polls(again, stuck, until=1000)
    assert hang.doing is Activity.START and 749 < now < 751
    # ...while its steps keep the learned 10 s.
    assert again.timeouts.limit_s(Activity.STEP, again.pace)[0] == 10.0
