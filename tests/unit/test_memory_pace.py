"""The memory tier's pace (`checkpoint.memory_interval_steps: auto`) is a pure function of
step times: no Ray, no processes."""

import math

import pytest

from orchestrator.checkpoint.memory_pace import (COST_BUDGET, MAX_INTERVAL, CopyPace,
                                                 interval_for)


def test_the_interval_spreads_a_copys_cost_to_within_the_budget_of_each_step():
    # A 10 ms step, 8.7 ms more with a copy in flight: at 5% of a step (0.5 ms) a copy per
    # 17.4 steps would do; one per 18 steps stays within it.
    assert interval_for(0.010, 0.0187) == 18
    assert 0.0087 / interval_for(0.010, 0.0187) <= COST_BUDGET * 0.010
    assert interval_for(0.010, 0.0187, budget=0.5) == 2


def test_a_copy_that_costs_nothing_measurable_is_taken_every_step():
    assert interval_for(0.2, 0.2) == 1
    assert interval_for(0.2, 0.19) == 1  # noise: a step with a copy came out faster
    assert interval_for(0.2, 0.2 + 0.2 * COST_BUDGET * 0.9) == 1  # within the budget


@pytest.mark.parametrize("step_s, with_copy_s", [(0.0, 0.1), (-1.0, 0.1), (math.nan, 0.1),
                                                  (0.1, math.inf), (math.inf, math.inf)])
def test_times_that_cannot_be_right_give_every_step_not_an_error(step_s, with_copy_s):
    assert interval_for(step_s, with_copy_s) == 1


def test_copies_far_dearer_than_a_step_stop_at_the_longest_interval():
    assert interval_for(0.001, 10.0) == MAX_INTERVAL


def test_the_probe_times_steps_without_then_with_a_copy_in_flight():
    pace = CopyPace(probe_steps=3)
    # Steps of 10 ms without a copy, 31.2 ms with the copy of the step before in flight.
    ends = [0.0, 0.010, 0.020, 0.030, 0.0612, 0.0924, 0.1236]
    copies = [pace.tick(t) for t in ends]
    # Ticks 4..6 copy (the step just ended); each interval up to ticks 5..7 has one in flight.
    assert copies == [False, False, False, True, True, True, False]
    assert pace.measured
    step_s, with_copy_s = pace.step_times()
    assert step_s == pytest.approx(0.010) and with_copy_s == pytest.approx(0.0312)
    assert pace.proposal() == 43  # 21.2 ms a copy / 0.5 ms a step = 42.4


def test_the_probe_takes_medians_so_one_slow_step_does_not_decide():
    pace = CopyPace(probe_steps=3)
    for t in [0.0, 0.010, 0.510, 0.520, 0.531, 0.542, 0.553]:  # one 500 ms hiccup
        pace.tick(t)
    step_s, with_copy_s = pace.step_times()
    assert step_s == pytest.approx(0.010) and with_copy_s == pytest.approx(0.011)


def test_not_measured_until_the_last_probe_step_ended():
    pace = CopyPace(probe_steps=2)
    for t in range(4):
        pace.tick(float(t))
        assert not pace.measured
    pace.tick(4.0)
    assert pace.measured
