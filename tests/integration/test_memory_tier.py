"""The memory tier on real gloo processes: copies taken while training, the buddy ring, and a
restore in which some ranks come back as new processes (no Ray: the restore itself)."""

from __future__ import annotations

import os

import pytest

from orchestrator.checkpoint.memory_arena import PREFIX
from orchestrator.local_gang import run_gang
from tests.integration import memory_scenarios as sc


@pytest.mark.parametrize("parallelism,share_memory,overlap",
                         [("ddp", True, False), ("fsdp", True, True), ("ddp", False, False)],
                         ids=["ddp-shared-pages-inline", "fsdp-shared-pages-overlapped",
                              "ddp-over-gloo"])
def test_new_processes_get_their_state_of_the_last_step_from_their_buddies(
        tmp_path, parallelism, share_memory, overlap):
    results = run_gang(sc.lose_and_restore, 4, parallelism, {0, 2}, 5, 3, share_memory, None,
                       overlap, out_dir=str(tmp_path))
    # One machine: every buddy maps its neighbour's arenas, unless told to act as on two.
    (links,) = [e for e in results[0]["events"] if e["kind"] == "memory_links"]
    assert (links["shared"], links["gloo"]) == ((4, 0) if share_memory else (0, 4))
    # Each arena file was unlinked once mapped: none of these processes left one behind.
    pids = {str(r["pid"]) for r in results}
    assert not [n for n in os.listdir("/dev/shm")
                if n.startswith(PREFIX) and n[len(PREFIX):].split("-")[0] in pids]
    for rank, r in enumerate(results):
        assert r["restored"] == 5, r
        # Model, optimizer, step, data position and RNG: all of it as it was after step 5.
        assert r["equal"] == r["keys"], sorted(set(r["keys"]) - set(r["equal"]))
        assert any(k.startswith("train.optimizer.state.") for k in r["keys"])
        assert any(k.startswith("rng_rank") for k in r["keys"])
    (event,) = [e for e in results[0]["events"] if e["kind"] == "memory_restored"]
    assert event["step"] == 5
    assert [(s["rank"], s["holder"], s["kind"]) for s in event["sources"]] == [
        (0, 3, "buddy"), (1, 1, "own"), (2, 1, "buddy"), (3, 3, "own")]


def test_neighbours_lost_together_or_a_newer_storage_step_restore_nothing(tmp_path):
    adjacent = run_gang(sc.lose_and_restore, 4, "ddp", {1, 2}, 4, 0, out_dir=str(tmp_path))
    for r in adjacent:
        assert r["restored"] is None and r["held"] == []  # cleared: storage comes next
    (skipped,) = [e for e in adjacent[0]["events"] if e["kind"] == "memory_restore_skipped"]
    assert "rank(s) 2" in skipped["reason"], skipped

    newer = run_gang(sc.lose_and_restore, 2, "ddp", set(), 4, 6, out_dir=str(tmp_path))
    assert [r["restored"] for r in newer] == [None, None]
    (skipped,) = [e for e in newer[0]["events"] if e["kind"] == "memory_restore_skipped"]
    assert "newer step (6)" in skipped["reason"]


@pytest.mark.parametrize("share_memory", [True, False], ids=["shared-pages", "over-gloo"])
def test_a_state_that_changes_shape_mid_attempt_is_copied_in_its_new_layout(tmp_path,
                                                                            share_memory):
    # One of rank 1's optimizer state tensors is replaced at step 4 (new storage, as a
    # load_state_dict does), after the copies of steps 1-3. Rank 0 lost: its copies at
    # rank 1 are untouched, and rank 1 restores from its own copies in the new layout.
    kept = run_gang(sc.lose_and_restore, 2, "ddp", {0}, 5, 0, share_memory, 4,
                    out_dir=str(tmp_path))
    for r in kept:
        assert r["restored"] == 5 and r["equal"] == r["keys"], r
    assert [e["step"] for e in kept[1]["events"] if e["kind"] == "memory_layout_changed"] == [4]
    # Rank 1 lost: over gloo its buddy received the new layout's copies; through shared
    # pages its buddy still maps the old arenas, which hold step 3 at most while rank 0's
    # own copies are of steps 4 and 5: no step is held for both, so storage comes next.
    lost = run_gang(sc.lose_and_restore, 2, "ddp", {1}, 5, 0, share_memory, 4,
                    out_dir=str(tmp_path))
    if share_memory:
        assert [r["restored"] for r in lost] == [None, None]
    else:
        for r in lost:
            assert r["restored"] == 5 and r["equal"] == r["keys"], r


def test_auto_paces_the_copies_to_the_dearest_rank_and_a_replacement_learns_the_pace(tmp_path):
    from orchestrator.checkpoint.memory_pace import PROBE_STEPS

    # Rank 1's steps take 50 ms (and a little more: the gang's own work), with a copy in
    # flight 50 ms more: a copy costs about a step, and at 5% of a step that is a copy every
    # 20 steps or so.
    steps = 2 * PROBE_STEPS + 1 + 150
    results = run_gang(sc.pace_and_learn, 4, 0.05, steps, out_dir=str(tmp_path))
    intervals = {r["interval"] for r in results}
    assert len(intervals) == 1, intervals  # one interval for the gang: the largest proposal
    (interval,) = intervals
    assert 12 <= interval <= 60, interval
    # The replacement took the survivors' pace at the restore: nobody probes again.
    assert [r["learned"] for r in results] == [interval] * 4
    (event,) = [e for e in results[0]["events"] if e["kind"] == "memory_interval"]
    assert event["interval_steps"] == interval and event["step"] == 2 * PROBE_STEPS + 1
    # After the probe's copies (steps P+1..2P), a copy every `interval` steps only: the
    # two generations held are the last two multiples of it.
    multiples = [s for s in range(2 * PROBE_STEPS + 1, steps + 1) if s % interval == 0]
    assert results[0]["held_steps"] == multiples[-2:]
