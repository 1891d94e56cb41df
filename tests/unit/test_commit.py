"""The commit protocol on storage: manifests, the committed-checkpoint scan, verification."""

import json
import uuid

import pytest

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout, parse_step_dir, step_dir_name
from orchestrator.checkpoint.manifest import FORMAT_VERSION, Manifest, ManifestError
from orchestrator.checkpoint.storage import Storage


@pytest.fixture(params=["local", "memory"])
def layout(request, tmp_path):
    url = str(tmp_path) if request.param == "local" else f"memory://t-{uuid.uuid4().hex}"
    return RunLayout(Storage(url), "run")


DATA = "save-a"


def save(layout, step, files=None, commit_it=True):
    files = files or {"__0_0.distcp": b"a" * 100, "__1_0.distcp": b"b" * 50, ".metadata": b"m"}
    for name, data in files.items():
        layout.storage.write_atomic(data, *layout.data_dir(step, DATA), name)
    names = commit.data_files(layout, step, DATA)
    entries = {}
    for rank in range(2):  # what two ranks would each checksum
        entries.update(commit.checksum_files(layout, step, DATA, commit.share_of(names, rank, 2)))
    if commit_it:
        commit.write_manifest(layout, Manifest(step=step, world_size=2, parallelism="ddp",
                                               files=entries, data_dir=DATA))


def test_step_dirs_are_zero_padded_and_sorted_by_number(layout):
    assert step_dir_name(120) == "step_000000120"
    assert parse_step_dir("step_000000120") == 120 and parse_step_dir("step_12") is None
    for step in (100, 20, 3):
        save(layout, step)
    assert layout.step_dirs() == [3, 20, 100]


def test_only_directories_with_a_manifest_are_checkpoints(layout):
    save(layout, 5)
    save(layout, 10, commit_it=False)  # an interrupted save: shards, no manifest
    candidates, rejected = commit.committed_checkpoints(layout)
    assert [c.step for c in candidates] == [5]
    assert rejected == []


def test_newest_first_and_every_file_listed_with_size_and_checksum(layout):
    save(layout, 5)
    save(layout, 10)
    candidates, _ = commit.committed_checkpoints(layout)
    assert [c.step for c in candidates] == [10, 5]
    files = candidates[0].manifest.files
    assert set(files) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert files["__0_0.distcp"].size == 100


def test_a_truncated_or_missing_file_rejects_the_checkpoint_cheaply(layout):
    save(layout, 5)
    save(layout, 10)
    layout.storage.write_atomic(b"a" * 10, *layout.data_dir(10, DATA), "__0_0.distcp")
    candidates, rejected = commit.committed_checkpoints(layout)
    assert [c.step for c in candidates] == [5]
    assert rejected[0].step == 10 and "__0_0.distcp has 10 bytes" in rejected[0].reason


def test_corrupted_bytes_of_the_same_size_fail_verification(layout):
    save(layout, 5)
    layout.storage.write_atomic(b"X" * 100, *layout.data_dir(5, DATA), "__0_0.distcp")
    (candidate,), _ = commit.committed_checkpoints(layout)  # same size: passes the cheap check
    found = commit.verify_files(layout, candidate.manifest, sorted(candidate.manifest.files))
    assert len(found.mismatched) == 1 and found.mismatched[0].startswith("__0_0.distcp")
    assert found.unreadable == []


def test_manifest_round_trips_and_refuses_a_future_format(layout):
    save(layout, 5)
    manifest = commit.read_manifest(layout, 5)
    assert manifest.format_version == FORMAT_VERSION and manifest.hash_algorithm == "xxh3_64"
    raw = json.loads(manifest.to_json())
    raw["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ManifestError, match="newer than this orchestrator reads"):
        Manifest.from_json(json.dumps(raw).encode())
    layout.storage.write_atomic(json.dumps(raw).encode(), *layout.manifest(5))
    candidates, rejected = commit.committed_checkpoints(layout)
    assert candidates == [] and "newer" in rejected[0].reason


def test_checksum_work_is_split_over_ranks_without_gaps():
    names = [f"f{i}" for i in range(7)]
    shares = [commit.share_of(names, r, 3) for r in range(3)]
    assert sorted(n for s in shares for n in s) == names


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_atomic(b"x", "a", "manifest.json")
    assert [e.name for e in storage.list_dir("a")] == ["manifest.json"]
