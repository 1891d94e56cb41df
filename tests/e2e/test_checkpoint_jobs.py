"""Checkpointing end to end on a real local Ray: async saves killed mid-write, a corrupted
shard, resharding across world sizes and parallelisms, a format-1 run resumed, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.chaos import FaultPlan
from orchestrator.checkpoint import commit
from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.manifest import FORMAT_VERSION
from orchestrator.events import read_event_lines
from tests.helpers import assert_same_final_state, events_of, flatten, make_config, run_job

pytestmark = pytest.mark.e2e

STEPS = 30
GPT = {"steps": STEPS, "seed": 1, "dropout": 0.1, "n_layer": 2, "n_embd": 32, "seq_len": 32,
       "parallelism": "ddp"}
FIXTURE = Path(__file__).parents[1] / "fixtures" / "format_v1" / "v1run"


# The storage path is what these tests are about: the memory tier, on by default, would resume
# from memory instead (tests/e2e/test_memory_tier.py covers that).
def gpt_job(storage, name, *, checkpoint=None, chaos=None, failure=None):
    return make_config(
        str(storage), name, workload={"entrypoint": "workloads.gpt:train", "args": GPT},
        scaling={"num_workers": 2}, checkpoint={"interval_steps": 5, "memory_interval_steps": 0, **(checkpoint or {})},
        failure={"max_restarts": 3, **(failure or {})}, chaos=chaos or {})


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    result, layout = run_job(gpt_job(tmp_path_factory.mktemp("ref"), "ref"))
    assert result.succeeded and result.summary["restarts"] == 0
    return layout


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_save_killed_during_its_background_write_resumes_to_the_same_weights(
        ray_cluster, tmp_path, reference, mode):
    config = gpt_job(tmp_path, f"async-{mode}", checkpoint={"async_mode": mode},
                     chaos=FaultPlan().kill_during_save(rank=1, step=15).config())
    result, layout = run_job(config)

    assert result.succeeded, result.message
    committed = events_of(layout, "checkpoint_committed")
    assert committed and all(e["mode"] == mode for e in committed)
    # Step 15's write was cut off before the commit: the restart resumed from step 10.
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10]
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")] == [10]
    assert [e["step"] for e in committed].count(15) == 1  # by the attempt after the kill
    assert_same_final_state(layout, reference, STEPS)


def test_a_corrupted_shard_in_the_latest_checkpoint_falls_back_to_the_previous(
        ray_cluster, tmp_path, reference):
    # A run killed at step 22 with no restarts left: steps 5 to 20 are committed.
    config = gpt_job(tmp_path, "corrupt", failure={"max_restarts": 0},
                     chaos=FaultPlan().kill_at(rank=0, step=22).config())
    result, layout = run_job(config)
    assert not result.succeeded
    manifest = commit.read_manifest(layout, 20)
    shard = sorted(n for n in manifest.files if n.endswith(".distcp"))[-1]
    path = Path(layout.storage.path(*layout.data_dir(20, manifest.data_dir), shard))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40  # one flipped bit, same size: only the checksum sees it
    path.write_bytes(bytes(data))

    result, layout = run_job(config)  # the same run again: it resumes
    assert result.succeeded, result.message
    (invalid,) = events_of(layout, "checkpoint_invalid")
    assert invalid["step"] == 20 and any(p.startswith(shard) for p in invalid["problems"])
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")] == [15]
    assert_same_final_state(layout, reference, STEPS)


def mlp_job(storage, name, workers, parallelism, **checkpoint):
    return make_config(
        str(storage), name,
        workload={"entrypoint": "workloads.mlp:train",
                  "args": {"steps": 8, "seed": 3, "batch_size": 16, "parallelism": parallelism}},
        scaling={"num_workers": workers}, checkpoint={"interval_steps": 1, "memory_interval_steps": 0, **checkpoint})


def test_a_4_worker_fsdp_checkpoint_resumes_on_2_workers_and_on_ddp(ray_cluster, tmp_path):
    result, four = run_job(mlp_job(tmp_path, "four", 4, "fsdp"))
    assert result.succeeded, result.message
    loss_at = {c.step: c.manifest.metrics["loss"] for c in commit.committed_checkpoints(four)[0]}
    assert commit.read_manifest(four, 4).world_size == 4

    for name, workers, parallelism in [("two-fsdp", 2, "fsdp"), ("two-ddp", 2, "ddp")]:
        shutil.copytree(Path(four.storage.path(four.run_name)), tmp_path / name)
        result, layout = run_job(mlp_job(tmp_path, name, workers, parallelism,
                                         restore=4, overwrite=True))
        assert result.succeeded, result.message
        (restored,) = events_of(layout, "checkpoint_restored")
        assert (restored["step"], restored["saved_world_size"], restored["world_size"],
                restored["saved_parallelism"]) == (4, 4, workers, "fsdp")
        after = commit.read_manifest(layout, 5)
        assert (after.world_size, after.parallelism) == (workers, parallelism)
        # The first step after resuming has the loss the 4-worker run logged at that step.
        assert abs(after.metrics["loss"] - loss_at[5]) <= 1e-5, (name, after.metrics, loss_at[5])
        # Checkpoints of steps after 4 from the 4-worker run were replaced by this run's.
        assert commit.read_manifest(layout, 8).world_size == workers


def test_a_format_1_run_resumes_and_continues_in_the_current_format(ray_cluster, tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "v1run")
    shutil.rmtree(tmp_path / "v1run" / "checkpoints" / "step_000000004")
    config = make_config(
        str(tmp_path), "v1run",
        workload={"entrypoint": "workloads.mlp:train", "args": {"steps": 4, "width": 8}},
        scaling={"num_workers": 2}, checkpoint={"interval_steps": 2, "memory_interval_steps": 0})
    result, layout = run_job(config)
    assert result.succeeded, result.message
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")] == [2]
    new = commit.read_manifest(layout, 4)
    assert new.data_dir.startswith("save-") and new.hash_algorithm == "xxh3_64"
    raw = json.loads(layout.storage.read_bytes(*layout.manifest(4)))
    assert raw["format_version"] == FORMAT_VERSION == 3
    # The fixture's own step 4 was written by the uninterrupted format-1 run. Another
    # machine's CPU kernels may round differently: equal to float precision.
    mine = flatten(load_full_state(layout, 4))
    theirs = flatten(load_full_state(type(layout)(type(layout.storage)(str(FIXTURE.parent)),
                                                  "v1run"), 4))
    for key in (k for k in theirs if k.startswith("train.model.")):
        assert torch.allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-6), key


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bad_storage_and_checkpoint_input_is_one_clear_line_and_deletes_nothing(tmp_path,
                                                                                  s3_server):
    mlp = ["--set", "workload.entrypoint=workloads.mlp:train"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        ([f"run.storage={blocker}/runs"], "cannot be written: Not a directory"),
        (["run.storage=s3://no-such-bucket/runs"], "cannot be written"),
        ([f"run.storage={tmp_path}/empty", "checkpoint.restore=5"],
         "step 5 has no committed checkpoint"),
    ]
    for overrides, message in cases:
        out = run_cli("run", *mlp, *[a for o in overrides for a in ("--set", o)])
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("step_*"))

    # A run whose latest checkpoint comes from a newer orchestrator: refused, untouched.
    shutil.copytree(FIXTURE, tmp_path / "runs" / "v1run")
    manifest = tmp_path / "runs" / "v1run" / "checkpoints" / "step_000000004" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["format_version"] = 99
    manifest.write_text(json.dumps(raw))
    (tmp_path / "runs" / "v1run" / "checkpoints" / "step_000000006").mkdir()  # debris too
    before = listing(tmp_path / "runs")
    out = run_cli("run", *mlp, "--set", f"run.storage={tmp_path}/runs", "--set",
                  "run.name=v1run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "newer orchestrator" in out.stderr and "Nothing was changed" in out.stderr
    assert listing(tmp_path / "runs") == before
    assert (tmp_path / "runs" / "v1run" / "checkpoints" / "step_000000006").is_dir()


def test_a_job_on_s3_survives_a_kill_and_never_writes_the_credentials(ray_cluster, s3_bucket,
                                                                      caplog):
    import ray

    config = make_config(
        f"{s3_bucket}/runs", "s3run",
        # Slow steps: the background save of step 4 has 1.5 s to land before the kill.
        workload={"entrypoint": "workloads.mlp:train",
                  "args": {"steps": 12, "step_time_s": 0.5}},
        scaling={"num_workers": 2},
        checkpoint={"interval_steps": 4, "async_mode": "thread", "keep_last": 1, "memory_interval_steps": 0},
        chaos=FaultPlan().kill_at(rank=1, step=7).config())
    with caplog.at_level("DEBUG"):
        result, layout = run_job(config)
    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [4]
    assert [c.step for c in commit.committed_checkpoints(layout)[0]] == [12]  # keep_last: 1

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    written = ["\n".join(read_event_lines(layout)).encode(),
               layout.storage.read_bytes(*layout.summary)]
    assert all(secret.encode() not in blob for blob in written)
    assert secret not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
