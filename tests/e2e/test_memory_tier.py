"""End to end on a real local Ray: with the memory tier (on by default), a restart resumes from
the state every rank kept of its latest step -- the survivors' own copies, and the lost ranks'
copies from their neighbours in the ring -- instead of the latest storage checkpoint, and the
run still ends with exactly the weights, optimizer and RNG state of an uninterrupted run."""

from __future__ import annotations

import pytest

from orchestrator.chaos import FaultPlan
from tests.helpers import assert_same_final_state, events_of, make_config, run_job

pytestmark = pytest.mark.e2e

STEPS = 40
KILL_AT = 37
# dropout > 0: the result depends on every rank's RNG state, so a restore that got one rank's
# RNG wrong would end with other weights.
GPT = {"steps": STEPS, "seed": 3, "dropout": 0.1, "n_layer": 2, "n_embd": 32, "seq_len": 32,
       "batch_size": 8}
VARIANTS = {
    "ddp": {**GPT, "parallelism": "ddp"},
    "fsdp_ac": {**GPT, "parallelism": "fsdp", "activation_checkpointing": "full"},
}


def job(tmp_path, variant: str, name: str, plan: FaultPlan | None = None, interval: int = 50,
        memory_interval: int = 1):
    return make_config(
        str(tmp_path), name,
        workload={"entrypoint": "workloads.gpt:train", "args": VARIANTS[variant]},
        scaling={"num_workers": 4},
        checkpoint={"interval_steps": interval, "memory_interval_steps": memory_interval},
        failure={"max_restarts": 3}, chaos=plan.config() if plan else {})


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            result, layout = run_job(job(tmp_path_factory.mktemp(variant), variant, "ref"))
            assert result.succeeded, result.message
            assert result.summary["restarts"] == 0
            cache[variant] = layout
        return cache[variant]

    return get


def sources_of(event: dict) -> dict[int, tuple[int, str]]:
    return {s["rank"]: (s["holder"], s["kind"]) for s in event["sources"]}


@pytest.mark.parametrize("variant", ["ddp", "fsdp_ac"])
def test_one_killed_rank_resumes_from_memory_with_its_state_from_its_buddy(
        ray_cluster, tmp_path, uninterrupted, variant):
    result, layout = run_job(job(tmp_path, variant, "kill", FaultPlan().kill_at(rank=1, step=KILL_AT)))

    assert result.succeeded, result.message
    (restart,) = events_of(layout, "restart")
    assert restart["from_step"] == 0  # no storage checkpoint before step 50
    (restored,) = events_of(layout, "memory_restored")
    assert restored["step"] in (KILL_AT - 1, KILL_AT)
    # One node: rank 0 maps rank 1's arenas, so the copy outlived rank 1's process in pages
    # rank 0 had mapped (no bytes were sent between them).
    assert [(e["shared"], e["gloo"]) for e in events_of(layout, "memory_links")][0] == (4, 0)
    # Rank 1 is a new process: its state came from rank 0, which holds rank 1's copy.
    assert sources_of(restored) == {0: (0, "own"), 1: (0, "buddy"), 2: (2, "own"),
                                    3: (3, "own")}
    assert not events_of(layout, "checkpoint_restored")
    assert result.summary["lost_steps"] <= 1
    assert_same_final_state(layout, uninterrupted(variant), STEPS)


def test_two_non_adjacent_ranks_killed_at_once_resume_from_memory(ray_cluster, tmp_path,
                                                                  uninterrupted):
    plan = FaultPlan().kill_at(rank=0, step=KILL_AT).kill_at(rank=2, step=KILL_AT)
    result, layout = run_job(job(tmp_path, "fsdp_ac", "two", plan))

    assert result.succeeded, result.message
    lost = {f["rank"] for f in events_of(layout, "failure") if f["failure_kind"] == "worker_died"}
    assert lost == {0, 2}
    restored = events_of(layout, "memory_restored")
    assert restored and restored[-1]["step"] in (KILL_AT - 1, KILL_AT)
    assert sources_of(restored[-1]) == {0: (3, "buddy"), 1: (1, "own"), 2: (1, "buddy"),
                                        3: (3, "own")}
    assert_same_final_state(layout, uninterrupted("fsdp_ac"), STEPS)


def test_two_adjacent_ranks_killed_at_once_fall_back_to_storage(ray_cluster, tmp_path,
                                                                uninterrupted):
    plan = FaultPlan().kill_at(rank=1, step=KILL_AT).kill_at(rank=2, step=KILL_AT)
    result, layout = run_job(job(tmp_path, "ddp", "adjacent", plan, interval=25))

    assert result.succeeded, result.message
    assert not events_of(layout, "memory_restored")
    skipped = events_of(layout, "memory_restore_skipped")
    assert skipped and "rank(s) 2" in skipped[-1]["reason"], skipped
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")][-1] == 25
    assert_same_final_state(layout, uninterrupted("ddp"), STEPS)
