"""The command line as a user runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import events_of

ROOT = Path(__file__).resolve().parents[2]


def orchestrator(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("override, key", [
    ("scaling.bogus=1", "scaling.bogus"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("run.storage=gopher://host/runs", "run.storage"),
    ("workload.args.n_layr=3", "workload.args.n_layr"),
    ("workload.args.parallelism=tp", "workload.args.parallelism"),
    ("checkpoint.async_mode=sometimes", "checkpoint.async_mode"),
])
def test_bad_config_exits_2_with_one_line_and_starts_nothing(tmp_path, override, key):
    storage = tmp_path / "runs"
    proc = orchestrator("run", "examples/gpt.yaml", "--set", f"run.storage={storage}",
                        "--set", override, timeout_s=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Ray" not in proc.stderr + proc.stdout  # no cluster was started or joined
    assert not storage.exists()  # nothing was written


def test_a_gang_larger_than_the_embedded_ray_is_refused_at_once(tmp_path):
    """The embedded Ray cannot grow: 64 one-CPU workers are exit 2 naming the key, not a
    wait of scaling.placement_timeout_s for a gang that can never be placed."""
    proc = orchestrator("run", "examples/gpt.yaml", "--set", f"run.storage={tmp_path}",
                        "--set", "scaling.num_workers=64", timeout_s=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "orchestrator: scaling.num_workers: 64 workers of 1 CPU need 64 CPU" in proc.stderr
    layout = RunLayout(Storage(str(tmp_path)), "demo")
    assert events_of(layout) == []  # no driver started
    from orchestrator.lease import RunLease
    assert RunLease(layout, 30)._read(1).released  # and the next run is not kept waiting


def test_missing_config_file_exits_2(tmp_path):
    proc = orchestrator("run", str(tmp_path / "nope.yaml"), timeout_s=60)
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr


@pytest.mark.e2e
def test_a_crash_loop_exits_nonzero_with_the_failures(ray_cluster, tmp_path):
    proc = orchestrator(
        "run", "--address", ray_cluster, "--set", f"run.storage={tmp_path}",
        "--set", "run.name=crash", "--set", "workload.entrypoint=workloads.mlp:train",
        "--set", "workload.args={steps: 8}", "--set", "failure.crash_loop_limit=2",
        "--set", "chaos.faults=[{kind: raise, rank: 0, at_step: 3, repeat: true}, "
                 "{kind: raise, rank: 1, at_step: 3, repeat: true}]",
        "--set", "checkpoint.interval_steps=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "job stopped" in proc.stderr and "failure.crash_loop_limit=2" in proc.stderr
    assert ("attempt 0: ranks 0,1: user_error: InjectedFault: injected fault: raise at step 3"
            in proc.stderr)
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["status"] == "failed" and len(summary["failures"]) == 4


@pytest.mark.e2e
def test_the_main_job_survives_its_injected_kills_on_an_embedded_ray(tmp_path):
    """The README's first command: examples/gpt.yaml on an embedded local Ray."""
    proc = orchestrator("run", "examples/gpt.yaml", "--set", f"run.storage={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    assert "job succeeded" in proc.stdout
    layout = RunLayout(Storage(str(tmp_path)), "demo")
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10, 15]
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["steps_completed"] == 40 and summary["final_checkpoint_step"] == 40
