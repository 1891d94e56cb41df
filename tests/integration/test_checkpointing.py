"""The checkpoint layer on real gloo processes and real storage (local disk and S3):
async saves, retention, restore options, overwrite, integrity fallback."""

from __future__ import annotations

import pytest
import torch

from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.local_gang import run_gang
from tests.helpers import flatten
from tests.integration import ckpt_scenarios as sc


def model_of(url: str, step: int) -> dict[str, torch.Tensor]:
    full = flatten(load_full_state(RunLayout(Storage(url), sc.RUN), step))
    return {k.removeprefix("train.model."): v for k, v in full.items()
            if k.startswith("train.model.")}


def assert_equal_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["off", "thread", "process"])
def test_every_save_mode_commits_exactly_the_state_of_its_step(storage_url, tmp_path, mode):
    """The async snapshot is copied while the next step runs, yet holds the state of the step
    it was taken at (the optimizer waits for the copy); DDP and FSDP2."""
    for parallelism in ("ddp", "fsdp"):
        url = f"{storage_url}/{parallelism}"
        out = tmp_path / parallelism
        out.mkdir()
        results = run_gang(sc.train_and_save, 2, url, {"async_mode": mode}, 5, {2, 3, 5},
                           parallelism, out_dir=str(out))
        kinds = [e["kind"] for e in results[0]["events"]]
        assert kinds.count("checkpoint_committed") == 3, kinds
        for step in (2, 3, 5):
            assert_equal_models(model_of(url, step), results[0]["models"][step])


def test_background_saves_wait_for_the_slowest_rank_and_report_failures(storage_url, tmp_path):
    results = run_gang(sc.async_with_a_slow_and_a_failing_rank, 2, storage_url, "thread",
                       out_dir=str(tmp_path))
    rank0, rank1 = results
    kinds = [e["kind"] for e in rank0["events"]]
    # Training went on while rank 1 was still writing step 2 (it sleeps 1 s first): on both
    # ranks save() returned before that write ended, and the commit came after it. An order
    # of events, not a duration: a busy machine slows both sides alike.
    for rank in (rank0, rank1):
        assert rank["save_returned_at"][2] < rank1["wrote_at"][2]
    # At most one save in flight: step 3's save waited for step 2's, and said so.
    wait = next(e for e in rank0["events"] if e["kind"] == "checkpoint_wait")
    assert wait["step"] == 3 and wait["waiting_for"] == 2 and wait["waited_s"] > 0.3
    # Rank 1's failed write of step 3 is an event, and step 3 is not committed.
    failed = next(e for e in rank0["events"] if e["kind"] == "checkpoint_failed")
    assert failed["step"] == 3 and "no space left" in " ".join(failed["errors"])
    assert kinds.count("checkpoint_committed") == 2
    # finish() waited for the last save: it is committed when the job ends.
    assert rank0["committed"] == [6, 2]
    # The manifest came only after the slowest rank's write had finished.
    committed_at = {e["step"]: e["at"] for e in rank0["events"]
                    if e["kind"] == "checkpoint_committed"}
    for step in (2, 6):
        assert committed_at[step] >= rank1["wrote_at"][step]
    assert_equal_models(model_of(storage_url, 2), rank0["models"][2])


def test_a_failed_attempt_lets_its_save_in_flight_finish_before_it_ends(tmp_path):
    url = str(tmp_path / "storage")
    seen = run_gang(sc.close_waits_for_the_save_in_flight, 2, url, out_dir=str(tmp_path))[0]
    assert seen["no_wait"] == []  # a zero timeout returns while rank 1 is still writing
    assert seen["wait"][0] == 4  # with time to wait, the save committed before close returned


def test_a_failed_write_in_the_writer_process_is_an_event_and_training_goes_on(tmp_path):
    url = str(tmp_path / "storage")
    result = run_gang(sc.failing_write_in_writer_process, 2, url, out_dir=str(tmp_path))[0]
    failed = [e for e in result["events"] if e["kind"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [3]
    assert "writer process" in " ".join(failed[0]["errors"])
    assert result["committed"] == [6]


def test_restore_latest_best_step_partial_strict_corruption_and_overwrite(storage_url, tmp_path):
    seen = run_gang(sc.restore_matrix, 2, storage_url, out_dir=str(tmp_path))[0]
    saved = seen["saved"]
    # latest, best (step 4 has the lowest loss) and a named step.
    candidates, step, model, state_step = seen["latest"]
    assert (candidates, step, state_step) == ([6, 4, 2], 6, 6)
    assert_equal_models(model, saved[6])
    candidates, step, model, _ = seen["best"]
    assert candidates[0] == 4 and step == 4
    assert_equal_models(model, saved[4])
    candidates, step, model, _ = seen["step2"]
    assert (candidates, step) == ([2], 2)
    assert_equal_models(model, saved[2])
    # Model only: the weights of step 4; the optimizer state and data position untouched.
    step, model, data_position, largest_moment = seen["model_only"]
    assert step == 4 and data_position == 0 and largest_moment == 0.0
    assert_equal_models(model, saved[4])
    # A layer the checkpoint lacks: strict names the keys; lenient reports them and loads
    # everything else.
    assert "extra.weight" in seen["strict_error"] and "checkpoint.strict" in seen["strict_error"]
    step, (mismatch,), model = seen["lenient"]
    assert step == 6 and {"train.model.extra.bias", "train.model.extra.weight"} <= set(
        mismatch["missing"]) and all(".extra." in k for k in mismatch["missing"])
    assert_equal_models({k: v for k, v in model.items() if not k.startswith("extra")}, saved[6])
    # A flipped byte: the event names the file; the restore falls back to step 4.
    step, (invalid,), model = seen["fallback"]
    assert step == 4 and invalid["step"] == 6
    assert any(p.startswith(seen["corrupted"]) for p in invalid["problems"])
    assert_equal_models(model, saved[4])
    assert seen["after_corruption"] == [4, 2]
    assert seen["resaved"] == ([6, 4, 2], False)
    # Overwrite: refused by default; with it, written beside and switched in one step.
    assert "refusing to overwrite" in seen["refused"] and "checkpoint.overwrite" in seen["refused"]
    old_dir, new_dir, model, committed, listing, (replaced,) = seen["overwritten"]
    assert old_dir != new_dir and sorted(listing) == sorted(["manifest.json", new_dir])
    assert replaced["removed"] == [old_dir]
    assert_equal_models(committed, model)
    # Starting over at step 2 deletes the later checkpoints once the new one commits.
    start, committed, (deleted,) = seen["started_over"]
    assert start == 2 and committed == [3, 2] and deleted["steps"] == [4, 6]


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_retention_keeps_what_any_policy_keeps_and_always_the_latest(storage_url, tmp_path,
                                                                     mode):
    result = run_gang(sc.retention, 2, storage_url, mode, out_dir=str(tmp_path))[0]
    after = result["committed_after"]
    for step, committed in after.items():
        assert committed[0] == step  # the newest is never deleted
    # keep_last 2 -> 8, 9; keep_every 4 -> 4, 8; keep_best 1 (lowest loss) -> 3.
    assert after[9] == [9, 8, 4, 3]
    deleted = sorted(s for e in result["events"] if e["kind"] == "checkpoint_deleted"
                     for s in e["steps"])
    assert deleted == [1, 2, 5, 6, 7]


def test_a_file_url_is_local_storage(tmp_path):
    url = f"file://{tmp_path}/storage"
    results = run_gang(sc.train_and_save, 2, url, {}, 3, {3}, out_dir=str(tmp_path))
    assert (tmp_path / "storage" / sc.RUN / "checkpoints" / "step_000000003" /
            "manifest.json").exists()
    assert_equal_models(model_of(url, 3), results[0]["models"][3])
