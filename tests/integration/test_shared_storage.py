"""Every rank must reach the same storage: the workers' start-up probe, and the commit's own
check, on real gloo ranks whose `$RANK_DISK` gives each its own folder for the same
`run.storage` (as a per-node variable, or a local path on a multi-node cluster, does).
End to end on a two-node Ray cluster: tests/e2e/test_cluster.py."""

from __future__ import annotations

import os
import socket

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.storage_probe import write_driver_probe
from orchestrator.local_gang import run_gang
from tests.integration import ckpt_scenarios as sc


def test_ranks_that_share_the_storage_pass_the_probe_and_it_leaves_nothing(storage_url,
                                                                          tmp_path):
    token = write_driver_probe(RunLayout(Storage(storage_url), sc.RUN))
    assert token
    results = run_gang(sc.probe_storage, 3, storage_url, (), token, out_dir=str(tmp_path))
    assert [r["raised"] for r in results] == [None] * 3
    assert [r["left"] for r in results] == [[]] * 3  # the driver's probe too


def test_ranks_that_share_a_disk_the_driver_does_not_see_are_refused(tmp_path, monkeypatch):
    """`ray job submit` to a cluster whose workers all run on one node, with a local path:
    the workers agree with each other, and the driver on the head sees none of their files."""
    monkeypatch.setenv("RANK_DISK", str(tmp_path / "head"))
    token = write_driver_probe(RunLayout(Storage("$RANK_DISK/runs"), sc.RUN))
    worker_node = str(tmp_path / "worker_node")
    results = run_gang(sc.probe_storage, 2, "$RANK_DISK/runs", [worker_node] * 2, token,
                       out_dir=str(tmp_path))
    (raised,) = {r["raised"] for r in results}
    kind, message = raised
    assert kind == "StorageNotShared", message
    host = socket.gethostname()
    assert message.endswith(f"; ranks 0 ({host}), 1 ({host}) do not see what the driver wrote")


def test_ranks_on_their_own_disks_are_refused_alike_naming_who_sees_what(tmp_path):
    """Ranks 0 and 1 on one node, rank 2 on another: rank 0 misses rank 2's probe and rank 2
    misses rank 0's; every rank raises the same error, which says what to use instead."""
    node_a, node_b = str(tmp_path / "node_a"), str(tmp_path / "node_b")
    results = run_gang(sc.probe_storage, 3, "$RANK_DISK/runs", [node_a, node_a, node_b],
                       out_dir=str(tmp_path))
    (raised,) = {r["raised"] for r in results}
    kind, message = raised
    assert kind == "StorageNotShared", message
    host = socket.gethostname()
    assert message.endswith(f"; rank 0 ({host}) does not see the probes of rank 2 ({host}); "
                            f"rank 2 ({host}) does not see the probes of rank 0 ({host})")
    assert "use S3 or a filesystem every node mounts" in message
    assert [r["left"] for r in results] == [[]] * 3


def test_a_probe_that_cannot_be_written_is_a_storage_failure_not_a_sharing_verdict(
        tmp_path, mount_small_disk):
    """A full disk says nothing about sharing, and may pass: a storage_error (restarted
    within its budget), not a config error."""
    full = mount_small_disk(tmp_path / "full")
    sc.fill_disk(full)
    results = run_gang(sc.probe_storage, 2, "$RANK_DISK", [full, full], out_dir=str(tmp_path))
    (raised,) = {r["raised"] for r in results}
    kind, message = raised
    assert kind == "StorageFailure", message
    assert "rank 0 (" in message and "cannot write its probe" in message
    assert "No space left on device" in message


def test_the_commit_refuses_a_manifest_without_the_files_rank_0_cannot_see(tmp_path):
    disks = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    results = run_gang(sc.save_on_separate_disks, 2, disks, out_dir=str(tmp_path))
    assert [r["has_manifest"] for r in results] == [False, False]
    assert [r["committed"] for r in results] == [[], []]
    (failed,) = [e for e in results[0]["events"] if e["kind"] == "checkpoint_failed"]
    error = " ".join(failed["errors"])
    assert "rank 0 cannot see" in error and "__1_0.distcp" in error, error
    assert "use S3 or a shared filesystem" in error
    # The last save failed: the end of the job says so on every rank.
    assert {r["raised"][0] for r in results} == {"StorageFailure"}
    assert not os.path.exists(os.path.join(disks[0], "storage", "run", "checkpoints",
                                           "step_000000001"))  # its partial files removed
