"""Storage-level checkpoint chores on local disk and on S3 (moto's server on 127.0.0.1):
garbage collection of debris, the preflight write check, retries of transient errors."""

from __future__ import annotations

import errno
import json

import pytest

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.housekeeping import find_debris, mark_invalid, remove_debris
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import FORMAT_VERSION, Manifest
from orchestrator.checkpoint.storage import Storage, with_retries
from orchestrator.errors import StorageError


def committed(layout: RunLayout, step: int, data_dir: str = "save-a") -> None:
    layout.storage.write_atomic(b"shard", *layout.data_dir(step, data_dir), "__0_0.distcp")
    files = commit.checksum_files(layout, step, data_dir, ["__0_0.distcp"])
    commit.write_manifest(layout, Manifest(step=step, world_size=1, parallelism="ddp",
                                           files=files, data_dir=data_dir))


def names(layout: RunLayout, *parts: str) -> list[str]:
    return sorted(e.name for e in layout.storage.list_dir(*parts))


def test_gc_removes_debris_only_and_never_a_fresh_or_unreadable_step(storage_url):
    layout = RunLayout(Storage(storage_url), "run")
    committed(layout, 2)
    # An interrupted overwrite of step 2 left a second save folder.
    layout.storage.write_atomic(b"half", *layout.data_dir(2, "save-b"), "__0_0.distcp")
    # An interrupted first save of step 4: shards, no manifest.
    layout.storage.write_atomic(b"half", *layout.data_dir(4, "save-c"), "__0_0.distcp")
    # Step 6 from a newer orchestrator: never touched.
    committed(layout, 6)
    raw = json.loads(layout.storage.read_bytes(*layout.manifest(6)))
    raw["format_version"] = FORMAT_VERSION + 1
    layout.storage.write_atomic(json.dumps(raw).encode(), *layout.manifest(6))
    # Step 8 failed verification on an earlier restore.
    committed(layout, 8)
    mark_invalid(layout, 8, ["__0_0.distcp: checksum mismatch"])

    # Everything was written just now: it may be a save in flight, so nothing is debris yet.
    assert find_debris(layout, min_age_s=3600) == []

    debris = find_debris(layout, min_age_s=0)
    found = {"/".join(d.parts[2:]): d.reason for d in debris}
    assert set(found) == {"step_000000002/save-b", "step_000000004", "step_000000008"}
    assert "interrupted save" in found["step_000000004"]
    assert "marked invalid" in found["step_000000008"]
    remove_debris(layout, debris)
    assert layout.step_dirs() == [2, 6]
    assert names(layout, *layout.step_dir(2)) == ["manifest.json", "save-a"]
    assert names(layout, *layout.data_dir(6, "save-a")) == ["__0_0.distcp"]
    candidates, rejected = commit.committed_checkpoints(layout)
    assert [c.step for c in candidates] == [2] and rejected[0].future_format


def test_a_storage_that_refuses_writes_or_does_not_exist_is_one_clear_error(tmp_path,
                                                                             s3_server):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot be written: Not a directory"):
        Storage(str(blocker / "runs")).check_writable("run")
    with pytest.raises(StorageError, match="cannot be written: .*(bucket|NoSuchBucket)"):
        Storage("s3://no-such-bucket-here/runs").check_writable("run")
    import s3fs
    assert not s3fs.S3FileSystem().exists("no-such-bucket-here")  # and we did not create it


def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ETIMEDOUT, "timed out")
        return "ok"

    assert with_retries(flaky, "read", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [0.2, 0.4]

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read", sleep=sleeps.append)
    assert len(calls) == 1

    def always_down():
        raise ConnectionError("connection reset")

    sleeps.clear()
    with pytest.raises(ConnectionError):
        with_retries(always_down, "write", attempts=4, sleep=sleeps.append)
    assert sleeps == [0.2, 0.4, 0.8]
