"""Saves that fail for their storage, on real gloo ranks: a disk that is really full (a small
tmpfs, ENOSPC from the kernel), and S3 that refuses writes (403 AccessDenied) or keeps
throttling them past botocore's retries (503), through our protocol proxy.

Whatever the mode (sync, thread, process): nothing is committed for the failed step, a
`checkpoint_failed` event with `failure_kind: storage_error` says why, the save's partial
files are gone, the earlier checkpoint is byte for byte what it was, and
`checkpoint.on_save_error` / `checkpoint.max_failed_saves` decide what happens next.
(EACCES on local disk cannot be produced here: the tests run as root, which file modes do
not stop; S3's 403 is the same refusal, as s3fs reports it: PermissionError.)
"""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.local_gang import run_gang
from tests.faultproxy import FaultProxy, Rule
from tests.integration import ckpt_scenarios as sc


@pytest.fixture
def tiny_disk(tmp_path, mount_small_disk):
    return mount_small_disk(tmp_path / "disk")


def storage_failures(rank0: dict) -> dict[int, dict]:
    return {e["step"]: e for e in rank0["events"]
            if e["kind"] == "checkpoint_failed" and e.get("failure_kind") == "storage_error"}


def assert_step2_untouched(rank0: dict) -> None:
    assert rank0["step2_before"] and rank0["step2_after"] == rank0["step2_before"]


@pytest.mark.parametrize("mode", ["off", "thread", "process"])
def test_a_full_disk_fails_the_save_commits_nothing_and_training_goes_on(tiny_disk, tmp_path,
                                                                         mode):
    url = os.path.join(tiny_disk, "storage")
    results = run_gang(sc.saves_on_failing_storage, 2, url, {"async_mode": mode}, {4, 6},
                       tiny_disk, out_dir=str(tmp_path))
    rank0 = results[0]
    assert [r["raised"] for r in results] == [None, None]  # on_save_error: continue
    failed = storage_failures(rank0)
    assert sorted(failed) == [4, 6]
    for step in (4, 6):
        assert "No space left on device" in " ".join(failed[step]["errors"]), failed[step]
        assert failed[step]["then"] == "continue" and failed[step]["partial_files"] == "removed"
    assert [e["failed_in_row"] for _, e in sorted(failed.items())] == [1, 2]
    assert rank0["committed"] == [8, 2]
    assert rank0["step_dirs"] == [2, 8]  # the failed saves' partial files are gone
    assert_step2_untouched(rank0)
    final = sc.committed_model(url, 8)
    assert all(torch.equal(final[k], rank0["models"][8][k]) for k in final)


# Sync mode end to end: tests/e2e/test_storage_errors.py.
@pytest.mark.parametrize("mode", ["thread"])
def test_max_failed_saves_in_a_row_stop_the_job_naming_the_setting(tiny_disk, tmp_path, mode):
    url = os.path.join(tiny_disk, "storage")
    results = run_gang(sc.saves_on_failing_storage, 2, url,
                       {"async_mode": mode, "max_failed_saves": 2}, {4, 6, 8}, tiny_disk,
                       out_dir=str(tmp_path))
    for r in results:
        kind, message, step = r["raised"]
        assert kind == "SavesKeepFailing"
        assert "2 saves in a row failed (checkpoint.max_failed_saves=2)" in message
        # Sync: in the save of step 6 itself. Background: at the next step's agreement, or
        # at the start of the next save, every rank at the same step.
        assert step == 6 if mode == "off" else step in (7, 8)
    assert results[0]["raised"][2] == results[1]["raised"][2]
    assert sorted(storage_failures(results[0])) == [4, 6]
    assert results[0]["committed"] == [2] and results[0]["step_dirs"] == [2]
    assert_step2_untouched(results[0])


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_on_save_error_stop_ends_the_attempt_at_the_failed_save(tiny_disk, tmp_path, mode):
    url = os.path.join(tiny_disk, "storage")
    results = run_gang(sc.saves_on_failing_storage, 2, url,
                       {"async_mode": mode, "on_save_error": "stop"}, {4}, tiny_disk,
                       out_dir=str(tmp_path))
    for r in results:
        kind, message, step = r["raised"]
        assert kind == "StorageFailure" and "checkpoint.on_save_error=stop" in message
        assert step == 4 if mode == "off" else step in (5, 6)
    assert results[0]["raised"][2] == results[1]["raised"][2]
    assert storage_failures(results[0])[4]["then"] == "restart"
    assert results[0]["committed"] == [2] and results[0]["step_dirs"] == [2]
    assert_step2_untouched(results[0])


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(upstream=os.environ["AWS_ENDPOINT_URL"]) as p:
        yield p


@pytest.mark.parametrize("action, mode", [("403", "off"), ("503", "thread")])
def test_s3_refusing_a_save_commits_nothing_and_training_goes_on(s3_bucket, proxy, tmp_path,
                                                                 action, mode):
    """Every write of step 4 is refused (403: a bucket policy) or throttled past the retries
    (503 with botocore allowed 2 attempts, so it shows in seconds)."""
    url = f"{s3_bucket}/run"
    rule = proxy.add(Rule(method="PUT", path=r"step_000000004/", action=action))
    results = run_gang(sc.with_s3_attempts, 2, 2, sc.saves_on_failing_storage, url,
                       {"async_mode": mode}, {4}, out_dir=str(tmp_path),
                       env={"AWS_ENDPOINT_URL": proxy.url})
    rank0 = results[0]
    assert rule.fired >= 1 and [r["raised"] for r in results] == [None, None]
    (failed,) = storage_failures(rank0).values()
    assert failed["step"] == 4 and failed["partial_files"] == "removed"
    words = {"403": ("Forbidden", "Access Denied", "PermissionError", "AccessDenied"),
             "503": ("SlowDown", "reduce your request rate", "503")}[action]
    assert any(w in " ".join(failed["errors"]) for w in words), failed["errors"]
    assert rank0["committed"] == [8, 6, 2] and rank0["step_dirs"] == [2, 6, 8]
    assert_step2_untouched(rank0)
