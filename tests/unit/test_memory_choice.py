"""Which step the memory tier restores, and from whom: a pure function of what each process
of the new gang holds."""

from orchestrator.checkpoint.memory import (BUDDY, INLINE_COPY_BYTES, OWN, Held, MemoryChoice,
                                            choose_memory_step, copy_inline)


def ring(world: int, steps: list[int], lost: set[int]) -> list[list[Held]]:
    """What each process holds after a loss: survivors their own copies and their right
    neighbour's (rank r holds r+1's); new processes nothing."""
    return [[] if p in lost else
            [h for s in steps for h in (Held(p, s, OWN), Held((p + 1) % world, s, BUDDY))]
            for p in range(world)]


def test_one_loss_takes_the_newest_step_from_the_lost_ranks_left_neighbour():
    choice = choose_memory_step(4, ring(4, [36, 37], {1}), at_least=0)
    assert choice == MemoryChoice(37, (0, 0, 2, 3))


def test_non_adjacent_losses_are_covered_adjacent_ones_are_not():
    assert choose_memory_step(4, ring(4, [36], {0, 2}), 0) == MemoryChoice(36, (3, 1, 1, 3))
    why = choose_memory_step(4, ring(4, [36], {1, 2}), 0)
    assert isinstance(why, str) and "rank(s) 2" in why


def test_survivors_that_disagree_fall_back_to_the_newest_step_they_all_hold():
    held = ring(3, [36], set())
    held[0] += [Held(0, 37, OWN), Held(1, 37, BUDDY)]  # only rank 0 finished step 37's copy
    held[1] += [Held(1, 37, OWN)]
    assert choose_memory_step(3, held, 0) == MemoryChoice(36, (0, 1, 2))


def test_a_newer_storage_checkpoint_or_an_empty_gang_wins():
    assert "newer step (40)" in choose_memory_step(2, ring(2, [36], set()), at_least=40)
    assert "every process is new" in choose_memory_step(2, [[], []], at_least=0)
    # The same step in storage and memory: memory, which needs no read.
    assert choose_memory_step(2, ring(2, [36], set()), at_least=36) == MemoryChoice(36, (0, 1))


def test_copies_of_ranks_outside_the_gang_are_ignored():
    held = [[Held(0, 5, OWN), Held(5, 9, OWN)], [Held(1, 5, OWN)]]
    assert choose_memory_step(2, held, 0) == MemoryChoice(5, (0, 1))


def test_small_copies_are_taken_inline_and_large_or_sent_ones_overlap_the_next_step():
    assert copy_inline(1_300_000, over_gloo=False)  # the main job's GPT
    assert not copy_inline(INLINE_COPY_BYTES, over_gloo=False)  # GPT 4x256 is 38 MB
    assert not copy_inline(1_300_000, over_gloo=True)  # the exchange waits on a peer
