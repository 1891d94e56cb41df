"""ProgressWatch is pure: times are passed in."""

from orchestrator.hangs import ProgressWatch


def test_no_verdict_before_the_timeout_and_progress_resets_the_clock():
    watch = ProgressWatch(range(2), now=0.0, hang_timeout_s=10)
    assert watch.hung(set(), now=9.9) == set()
    watch.saw(0, 1, now=9.9)
    watch.saw(1, 1, now=9.9)
    assert watch.hung(set(), now=19.0) == set()
    assert watch.hung(set(), now=20.0) == {0, 1}  # answering but stuck: all hung


def test_the_silent_rank_is_the_culprit_and_finished_ranks_never_hang():
    watch = ProgressWatch(range(3), now=0.0, hang_timeout_s=5)
    for t in (2.0, 4.0, 6.0):
        watch.saw(0, 1, now=t)  # answers, no new progress after t=2
    watch.saw(1, 1, now=2.0)  # then silent
    assert watch.hung({2}, now=8.0) == {1}
