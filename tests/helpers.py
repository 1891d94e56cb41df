"""Helpers for tests: building configs, running jobs in-process, comparing checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.config import JobConfig, from_dict
from orchestrator.events import read_events


ROOT = Path(__file__).resolve().parents[1]


def start_driver(address: str, storage: str | Path, name: str, args: dict[str, Any],
                 *overrides: str, interval_steps: int = 5) -> subprocess.Popen:
    """`orchestrator run` of the MLP workload as its own process, on the cluster at
    `address`, as a user or a scheduler would start it; stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "--address", address,
         "--set", f"run.storage={storage}", "--set", f"run.name={name}",
         "--set", "workload.entrypoint=workloads.mlp:train",
         "--set", f"workload.args={json.dumps(args)}",
         "--set", f"checkpoint.interval_steps={interval_steps}",
         *[a for o in overrides for a in ("--set", o)]],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def multi_node_cluster(nodes: int):
    """A `ray.cluster_utils.Cluster`: a head that runs no workers and `nodes` 1-CPU worker
    nodes. The GCS health check is tuned from 3 s x 5 to 0.5 s x 2, as one would on a cluster
    of preemptible machines, so that Ray declares a lost node dead within about a second."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                           "health_check_timeout_ms": 500},
    })
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    return cluster


def make_config(storage: str, name: str = "run", **sections: dict[str, Any]) -> JobConfig:
    raw: dict[str, Any] = {"run": {"name": name, "storage": storage}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(JobConfig, raw)


def run_job(config: JobConfig):
    """Run a whole job on the already-started Ray; returns (JobResult, layout)."""
    from orchestrator.driver import Driver
    from orchestrator.worker_group import RayWorkerGroup

    layout = RunLayout(Storage(config.run.storage_url), config.run.name)
    result = Driver(config, RayWorkerGroup(config), layout).run()
    return result, layout


def events_of(layout: RunLayout, kind: str | None = None) -> list[dict]:
    return [e for e in read_events(layout) if kind is None or e["kind"] == kind]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_same_final_state(a: RunLayout, b: RunLayout, step: int) -> None:
    """Every tensor (model, optimizer, RNG) and every value of two checkpoints is identical."""
    fa, fb = flatten(load_full_state(a, step)), flatten(load_full_state(b, step))
    assert fa.keys() == fb.keys()
    unequal = [k for k in fa
               if (not torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor)
                   else fa[k] != fb[k])]
    assert not unequal, f"differs from the uninterrupted run: {unequal[:10]}"
    assert any(k.startswith("train.model.") for k in fa)
    assert any(k.startswith("train.optimizer.state.") for k in fa)


def poll_until(condition, timeout_s: float, what: str):
    """Wait for `condition()` to return something truthy, and return it; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
