"""End to end as the README shows it: `ray job submit --working-dir . -- orchestrator run ...`
to a head started with `ray start --head` (on 127.0.0.1, its own temp dir, token
authentication on as on a new Ray 2.60 cluster), a worker kill injected: the job SUCCEEDs and
`ray job logs` shows its progress and the recovery. `ray job stop` of a running job stops every
worker, and the next submission resumes the run.

The head is `ray start --head --block` in a child process: stopping that process (by its id)
stops every Ray process it started, and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import tempfile

import psutil
import pytest

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import ROOT, events_of, poll_until

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A Ray head of our own; yields (dashboard address, environment for the `ray` CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard,
             "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
             "--ray-client-server-port": _free_port(), "--node-manager-port": _free_port(),
             "--object-manager-port": _free_port()}
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *[f"{k}={v}" for k, v in ports.items()]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        poll_until(lambda: proc.poll() is not None or ray_cli(
            env, "job", "list", "--address", address).returncode == 0, 120, "the head")
        assert proc.poll() is None, proc.stdout.read()
        yield address, env
    finally:
        proc.terminate()  # --block: stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(address: str, env: dict, storage, name: str, *overrides: str) -> str:
    sets = [f"run.storage={storage}", f"run.name={name}",
            "workload.entrypoint=workloads.mlp:train", "checkpoint.interval_steps=5",
            "scaling.resources_per_worker={CPU: 1}", *overrides]
    done = ray_cli(env, "job", "submit", "--address", address, "--no-wait", "--working-dir",
                   ".", "--", "orchestrator", "run", *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = re.findall(r"raysubmit_\w+", done.stdout + done.stderr)[:1]
    return job_id


def status(address: str, env: dict, job_id: str) -> str:
    """PENDING, RUNNING, ... as `ray job status` says (an ended job: "Job '...' succeeded")."""
    out = ray_cli(env, "job", "status", "--address", address, job_id).stdout
    found = re.findall(r"Status for job '[^']+': (\w+)|Job '[^']+' (?:was )?(succeeded|failed|stopped)",
                       out)
    return "".join(found[-1]).upper() if found else ""


def logs(address: str, env: dict, job_id: str) -> str:
    return ray_cli(env, "job", "logs", "--address", address, job_id).stdout


def test_a_submitted_job_survives_a_kill_and_its_logs_show_progress_and_recovery(
        head, tmp_path):
    address, env = head
    refused = ray_cli({**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""},
                      "job", "list", "--address", address)
    assert refused.returncode != 0  # as the README says: without the token, refused

    # A copy every step (not `auto`'s measured pace), so that the memory tier holds a step
    # newer than storage's 10 when rank 1 dies at 12, whatever this machine's speed.
    job_id = submit(address, env, tmp_path / "runs", "submitted",
                    "workload.args={steps: 30, step_time_s: 0.05}",
                    "checkpoint.memory_interval_steps=1",
                    "chaos.faults=[{kind: kill, rank: 1, at_step: 12}]")
    poll_until(lambda: status(address, env, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"),
               300, "the job to end")
    text = logs(address, env, job_id)
    assert status(address, env, job_id) == "SUCCEEDED", text[-3000:]
    # Progress as plain lines (a job log is no terminal): no bar, no escapes.
    assert re.search(r"step \d+/30 loss=[\d.]+ \| [\d.]+ steps/s \| committed", text), text[-3000:]
    assert "\r" not in text
    # The recovery, said by us: what happened and what comes next; Ray's banner is one line.
    assert "attempt 0 failed: rank 1: worker_died" in text
    assert ("attempt 1: replacing rank(s) 1, resuming from the memory tier if the gang still "
            "holds every rank's state, else the checkpoint of step 10") in text
    # ... and rank 0 says which it was: rank 0 holds rank 1's buddy copy, so memory.
    assert re.search(r"resumed from the memory tier at step 1[12] \(rank 0: own, rank 1: buddy "
                     r"copy on rank 0\)", text), text[-3000:]
    assert "A worker died or was killed" not in text
    assert "job succeeded" in text
    layout = RunLayout(Storage(str(tmp_path / "runs")), "submitted")
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10]
    (start,) = events_of(layout, "job_start")
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["status"] == "succeeded" and summary["steps_completed"] == 30
    assert start["config"]["run"]["storage"] == str(tmp_path / "runs")


def test_ray_job_stop_stops_every_worker_and_the_next_submission_resumes(head, tmp_path):
    address, env = head
    storage = tmp_path / "runs"
    layout = RunLayout(Storage(str(storage)), "stopped")
    args = "workload.args={steps: 60, step_time_s: 0.2}"
    job_id = submit(address, env, storage, "stopped", args)
    poll_until(lambda: layout.storage.exists(*layout.events) and any(
        e["step"] >= 10 for e in events_of(layout, "checkpoint_committed")), 300,
        "two checkpoints")
    pids = [w["pid"] for w in events_of(layout, "workers_started")[-1]["workers"]]
    stopped = ray_cli(env, "job", "stop", "--address", address, job_id, timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    poll_until(lambda: status(address, env, job_id) == "STOPPED", 120, "STOPPED")

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    poll_until(lambda: all(gone(p) for p in pids), 60, "every worker to end")
    committed_before = max(e["step"] for e in events_of(layout, "checkpoint_committed"))

    # Resubmitted as it was, but with steps that do not sleep: nothing is timed from here.
    again = submit(address, env, storage, "stopped", args, "workload.args.step_time_s=0")
    poll_until(lambda: status(address, env, again) in ("SUCCEEDED", "FAILED", "STOPPED"),
               300, "the resubmitted job to end")
    assert status(address, env, again) == "SUCCEEDED", logs(address, env, again)[-3000:]
    restored = events_of(layout, "checkpoint_restored")
    assert restored and restored[-1]["step"] >= committed_before >= 10
    assert len(events_of(layout, "job_start")) == 2
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert summary["status"] == "succeeded" and summary["final_checkpoint_step"] == 60
