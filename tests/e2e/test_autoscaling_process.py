"""Runs tests/autoscaling in a pytest process of its own, after every other test
(conftest.py orders it last) and once this process's Ray is shut down:
AutoscalingCluster's `ray stop --force` would end any other Ray on the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.own_ray]


def ray_processes() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"])
            if p.info["name"] in ("raylet", "gcs_server")]


def test_autoscaling_runs_in_a_process_of_their_own():
    import ray

    ray.shutdown()  # the shared test cluster's processes are this process's children
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), (f"Ray processes {ray_processes()} still run on this machine: "
                                 "the autoscaling tests would stop them, so they do not start")
    env = {**os.environ, "ORCHESTRATOR_OWN_RAY_PROCESS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/autoscaling", "-rA"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    # `ray stop --force` lists every process it ends: keep the test report, drop that.
    report = "\n".join(line for line in proc.stdout.splitlines()
                       if "scripts.py:" not in line)
    print(report[-8000:])
    assert proc.returncode == 0, report[-8000:] + proc.stderr[-3000:]
    assert "3 passed" in proc.stdout, proc.stdout[-3000:]
