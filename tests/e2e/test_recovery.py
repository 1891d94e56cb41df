"""End to end on a real local Ray: real worker processes SIGKILLed, real torch.distributed,
real files. Every interrupted run must end with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import pytest

from orchestrator.chaos import FaultPlan
from tests.helpers import assert_same_final_state, events_of, make_config, run_job

pytestmark = pytest.mark.e2e

STEPS = 30
# dropout > 0 makes the result depend on every rank's RNG state, so a resume that lost the
# RNG (or restored one rank's RNG on all ranks) would end with different weights.
GPT = {"steps": STEPS, "seed": 1, "dropout": 0.1, "n_layer": 2, "n_embd": 32, "seq_len": 32}
VARIANTS = {
    "ddp": {**GPT, "parallelism": "ddp"},
    "fsdp_ac": {**GPT, "parallelism": "fsdp", "activation_checkpointing": "full"},
}


# The storage path is what these tests are about: the memory tier, on by default, would resume
# from memory instead (tests/e2e/test_memory_tier.py covers that).
def gpt_job(tmp_path, variant: str, name: str, chaos: dict | None = None, **sections):
    return make_config(
        str(tmp_path), name,
        workload={"entrypoint": "workloads.gpt:train", "args": VARIANTS[variant]},
        scaling={"num_workers": 2}, checkpoint={"interval_steps": 5, "memory_interval_steps": 0},
        failure={"max_restarts": 3}, chaos=chaos or {}, **sections)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    """The reference run of each variant, computed once per module on first use."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            result, layout = run_job(gpt_job(tmp_path_factory.mktemp(variant), variant, "ref"))
            assert result.succeeded, result.message
            assert result.summary["restarts"] == 0
            cache[variant] = layout
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["ddp", "fsdp_ac"])
def test_kill_after_commit_restarts_once_from_latest_committed(ray_cluster, tmp_path,
                                                               uninterrupted, variant):
    config = gpt_job(tmp_path, variant, "kill", chaos=FaultPlan().kill_at(rank=1, step=12).config())
    result, layout = run_job(config)

    assert result.succeeded, result.message
    restarts = events_of(layout, "restart")
    assert len(restarts) == 1
    assert restarts[0]["from_step"] == 10  # the latest committed before step 12
    restored = [e["step"] for e in events_of(layout, "checkpoint_restored")]
    assert restored == [10]
    (failure,) = events_of(layout, "failure")
    assert (failure["failure_kind"], failure["rank"]) == ("worker_died", 1)
    assert result.summary["lost_steps"] == 2 and result.summary["steps_completed"] == STEPS
    assert_same_final_state(layout, uninterrupted(variant), STEPS)


@pytest.mark.parametrize("rank", [0, 1])
def test_kill_during_save_never_restores_that_step(ray_cluster, tmp_path, uninterrupted, rank):
    config = gpt_job(tmp_path, "ddp", f"save{rank}",
                     chaos=FaultPlan().kill_during_save(rank=rank, step=15).config())
    result, layout = run_job(config)

    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10]
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")] == [10]
    # Step 15's folder held shards but no manifest: the re-save's commit removed them.
    assert 15 in [e["step"] for e in events_of(layout, "checkpoint_replaced")]
    committed = [e["step"] for e in events_of(layout, "checkpoint_committed")]
    assert committed.count(15) <= 1  # committed once, by the attempt after the kill
    assert_same_final_state(layout, uninterrupted("ddp"), STEPS)


def test_two_failures_on_different_ranks_and_steps(ray_cluster, tmp_path, uninterrupted):
    chaos = FaultPlan().kill_at(rank=1, step=8).kill_during_save(rank=0, step=20).config()
    result, layout = run_job(gpt_job(tmp_path, "ddp", "two", chaos=chaos))

    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [5, 15]
    assert [(f["rank"], f["failure_kind"]) for f in result.summary["failures"]] == [
        (1, "worker_died"), (0, "worker_died")]
    assert result.summary["restarts"] == 2
    assert result.summary["lost_steps"] == 3 + 5
    assert_same_final_state(layout, uninterrupted("ddp"), STEPS)


@pytest.mark.parametrize("mode", ["full", "every_n:2", "selective", "selective:attention"])
def test_kill_and_resume_with_each_activation_checkpointing_mode(ray_cluster, tmp_path,
                                                                 uninterrupted, mode):
    """Checkpointing activations changes what is kept for backward, never the result: each
    mode, killed and resumed, ends with the weights of the uninterrupted run without it."""
    config = make_config(str(tmp_path), "ac", workload={
        "entrypoint": "workloads.gpt:train",
        "args": {**VARIANTS["ddp"], "activation_checkpointing": mode}},
        scaling={"num_workers": 2}, checkpoint={"interval_steps": 5, "memory_interval_steps": 0},
        chaos=FaultPlan().kill_at(rank=0, step=7).config())
    result, layout = run_job(config)
    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [5]
    assert_same_final_state(layout, uninterrupted("ddp"), STEPS)
