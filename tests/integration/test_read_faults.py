"""A read error is not corruption: reads of the newest checkpoint that fail (EIO from a
fault-injecting filesystem, on real gloo processes) are retried; if they keep failing, the
restore falls back to the previous checkpoint without marking or deleting anything, and a
later restore finds the newest one again."""

from __future__ import annotations

import errno

import pytest

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.housekeeping import find_debris
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manifest import ManifestError
from orchestrator.checkpoint.storage import ContentMismatch, Storage, classify_storage_error
from orchestrator.local_gang import run_gang
from tests.integration import ckpt_scenarios as sc


@pytest.mark.parametrize("error, kind", [
    (OSError(errno.EIO, "eio"), "transient"), (OSError(errno.ESTALE, "stale"), "transient"),
    (OSError(errno.ECONNRESET, "reset"), "transient"), (ConnectionResetError(), "transient"),
    (TimeoutError(), "transient"), (PermissionError(errno.EACCES, "no"), "permanent"),
    (FileNotFoundError(errno.ENOENT, "gone"), "permanent"), (OSError(errno.ENOSPC, "full"),
                                                               "permanent"),
    (ValueError("x"), "permanent"), (ContentMismatch("checksum"), "mismatch"),
    (ManifestError("malformed"), "mismatch"),
])
def test_storage_errors_are_classified_by_what_they_prove(error, kind):
    assert classify_storage_error(error) == kind


def test_transient_read_errors_are_retried_and_the_newest_checkpoint_restores(tmp_path):
    url = str(tmp_path / "storage")
    results = run_gang(sc.restore_through_read_faults, 2, url, "step_000000004/save-", 2,
                       out_dir=str(tmp_path))
    assert [r["first"] for r in results] == [4, 4]  # two EIOs, then the read went through
    assert [r["failed"] for r in results] == [2, 2]  # on each rank
    kinds = [e["kind"] for e in results[0]["events"]]
    assert "checkpoint_unreadable" not in kinds and "checkpoint_invalid" not in kinds


def test_persistent_read_errors_fall_back_and_leave_the_newest_checkpoint_untouched(tmp_path):
    url = str(tmp_path / "storage")
    results = run_gang(sc.restore_through_read_faults, 2, url, "step_000000004/save-", -1,
                       out_dir=str(tmp_path))
    assert [r["first"] for r in results] == [2, 2]
    (unreadable,) = [e for e in results[0]["events"] if e["kind"] == "checkpoint_unreadable"]
    assert unreadable["step"] == 4 and "cannot be read now" in unreadable["problems"][0]
    assert not [e for e in results[0]["events"] if e["kind"] == "checkpoint_invalid"]
    layout = RunLayout(Storage(url), sc.RUN)
    assert not layout.storage.exists(*layout.invalid_marker(4))  # not marked
    assert [c.step for c in commit.committed_checkpoints(layout)[0]] == [4, 2]  # still there
    assert find_debris(layout) == []  # nothing for gc either
    assert [r["second"] for r in results] == [4, 4]  # a later run restores it


def test_an_unreadable_manifest_is_skipped_not_marked(tmp_path):
    url = str(tmp_path / "storage")
    run_gang(sc.train_and_save, 2, url, {}, 4, {2, 4}, out_dir=str(tmp_path))
    layout = RunLayout(Storage(url), sc.RUN)
    layout.storage.fs = sc.FaultyLocal(layout.storage.fs, "step_000000004/manifest", -1)
    candidates, rejected = commit.committed_checkpoints(layout)
    assert [c.step for c in candidates] == [2]
    (r,) = rejected
    assert r.step == 4 and r.unreadable and not r.proven_bad
    assert "cannot be read now: OSError" in r.reason
    # A manifest read whole that does not parse is proof, and is marked as such.
    layout.storage.fs = layout.storage.fs._inner
    layout.storage.write_atomic(b"{not json", *layout.manifest(4))
    (r,) = commit.committed_checkpoints(layout)[1]
    assert r.proven_bad and "malformed" in r.reason
