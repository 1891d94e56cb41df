"""The goodput ledger: where a job's wall time went, folded from its events (no Ray)."""

import pytest

from orchestrator.goodput import CAUSES, GoodputLedger, breakdown


def span(first, last, start, end, busy_s=None):
    return {"first": first, "last": last, "start": start, "end": end,
            "busy_s": end - start if busy_s is None else busy_s}


def progress(time, attempt, s):
    return {"kind": "progress", "time": time, "attempt": attempt, "step": s["last"],
            "metrics": {"loss": 1.0}, "span": s}


def a_job_with_one_failure():
    """Start 5 s; steps 1-10 in 10 s (a save after 10 blocks 1 s); steps 11-14 in 4 s; a kill;
    2 s later a restart from 10; 3 s later steps 11-20 in 10 s; 1 s to the end."""
    return [
        {"kind": "job_start", "time": 100.0, "job_id": "j"},
        progress(115.0, 0, span(1, 10, 105.0, 115.0)),
        {"kind": "checkpoint_stall", "time": 116.0, "rank": 0, "step": 10, "blocked_s": 1.0,
         "gate_wait_s": 0.0},
        progress(120.0, 0, span(11, 14, 116.0, 120.0)),
        {"kind": "failure", "time": 121.0, "step": 14, "failure_kind": "worker_died"},
        {"kind": "restart", "time": 122.0, "from_step": 10},
        {"kind": "checkpoint_restored", "time": 124.0, "rank": 0, "step": 10},
        progress(135.0, 1, span(11, 20, 125.0, 135.0)),
        {"kind": "job_end", "time": 136.0},
    ]


def test_every_second_of_the_job_is_placed_once():
    g = breakdown(a_job_with_one_failure())
    assert g.wall_s == pytest.approx(36.0)
    assert g.productive_s == pytest.approx(20.0)  # steps 1-10 and the second 11-20
    assert g.lost_s["startup"] == pytest.approx(5.0)
    assert g.lost_s["checkpoint_stall"] == pytest.approx(1.0)
    assert g.lost_s["recomputed"] == pytest.approx(4.0)  # the first 11-14
    assert g.lost_s["recovery"] == pytest.approx(5.0)  # last step 120 -> next first step 125
    assert g.lost_s["finish"] == pytest.approx(1.0)
    assert g.lost_s["other"] == pytest.approx(0.0)
    assert g.productive_s + sum(g.lost_s.values()) == pytest.approx(g.wall_s)
    assert (g.steps_completed, g.lost_steps) == (20, 4)
    assert g.goodput == pytest.approx(20 / 36)
    summary = g.to_summary()
    assert set(summary["time_s"]) == {"productive", *CAUSES}


def test_a_restore_that_cuts_a_span_keeps_its_share_of_the_steps_before_it():
    events = [{"kind": "job_start", "time": 0.0, "job_id": "j"},
              progress(10.0, 0, span(1, 10, 0.0, 10.0)),
              {"kind": "restart", "time": 11.0, "from_step": 6}]
    g = breakdown(events)
    assert g.productive_s == pytest.approx(6.0) and g.lost_s["recomputed"] == pytest.approx(4.0)
    assert g.lost_steps == 4


def test_a_save_at_the_last_step_is_stall_not_finish_and_gate_waits_are_not_productive():
    events = [{"kind": "job_start", "time": 0.0, "job_id": "j"},
              progress(10.0, 0, span(1, 10, 0.0, 10.0)),
              {"kind": "checkpoint_stall", "time": 10.5, "rank": 0, "step": 10,
               "blocked_s": 3.0, "gate_wait_s": 0.5},
              {"kind": "checkpoint_stall", "time": 10.5, "rank": 1, "step": 10,
               "blocked_s": 9.0, "gate_wait_s": 9.0},  # rank 0's figures speak for the gang
              {"kind": "job_end", "time": 14.0}]
    g = breakdown(events)
    assert g.lost_s["checkpoint_stall"] == pytest.approx(3.5)
    assert g.productive_s == pytest.approx(9.5)
    assert g.lost_s["finish"] == pytest.approx(1.0)


def test_a_later_job_on_the_run_starts_the_ledger_again_and_a_continued_one_does_not():
    first = a_job_with_one_failure()
    later = [{"kind": "job_start", "time": 200.0, "job_id": "k"},
             progress(210.0, 0, span(21, 30, 202.0, 210.0)),
             {"kind": "job_end", "time": 211.0}]
    g = breakdown(first + later)
    assert g.wall_s == pytest.approx(11.0) and g.productive_s == pytest.approx(8.0)
    # A driver that died and the one that continued its job (the same job id): one job.
    continued = first[:5] + [{"kind": "job_start", "time": 130.0, "job_id": "j"},
                             {"kind": "restart", "time": 131.0, "from_step": 10},
                             progress(140.0, 1, span(11, 20, 132.0, 140.0)),
                             {"kind": "job_end", "time": 141.0}]
    g = breakdown(continued)
    assert g.wall_s == pytest.approx(41.0)
    assert g.lost_s["recovery"] == pytest.approx(12.0)  # 120 -> 132, the dead driver's gap too


def test_malformed_events_from_storage_are_skipped():
    events = a_job_with_one_failure()
    events[3:3] = ["not an event", None, {"kind": "progress", "time": "soon", "span": "x"},
                   {"kind": "restart", "time": 118.0, "from_step": "ten"},
                   {"kind": "progress", "time": 118.0, "span": {"first": 1}},
                   {"kind": "checkpoint_stall", "time": 118.0, "blocked_s": "a lot"}]
    assert breakdown(events) == breakdown(a_job_with_one_failure())


def test_a_running_job_is_measured_up_to_now():
    ledger = GoodputLedger()
    for e in a_job_with_one_failure()[:-1]:
        ledger.add(e)
    assert ledger.breakdown(now=140.0).wall_s == pytest.approx(40.0)
    assert GoodputLedger().breakdown().goodput == 0.0


def test_a_resume_from_the_memory_tier_loses_only_the_steps_after_its_copy():
    """The restart names the storage checkpoint (10); the workers resumed from memory (13)."""
    events = a_job_with_one_failure()
    at = next(i for i, e in enumerate(events) if e["kind"] == "checkpoint_restored")
    events[at] = {"kind": "memory_restored", "time": 124.0, "rank": 0, "step": 13,
                  "storage_step": 10}
    events[at + 1] = progress(132.0, 1, span(14, 20, 125.0, 132.0))
    events[-1]["time"] = 133.0
    g = breakdown(events)
    assert (g.steps_completed, g.lost_steps) == (20, 1)
    assert g.lost_s["recomputed"] == pytest.approx(1.0)  # step 14 of the first attempt
    assert g.productive_s == pytest.approx(20.0)
