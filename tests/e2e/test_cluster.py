"""End to end on clusters: a node lost under the workers, and the driver itself killed.

The driver runs as `orchestrator run --address ...` in a subprocess, exactly as a user (or
`ray job submit`) runs it; the test plays the cloud: it removes a node, or SIGKILLs the driver.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray

from orchestrator.checkpoint.commit import committed_checkpoints
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests import helpers
from tests.helpers import assert_same_final_state, events_of, poll_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"steps": 60, "step_time_s": 0.05}


def start_driver(address: str, storage: Path, name: str, *overrides: str) -> subprocess.Popen:
    return helpers.start_driver(address, storage, name, ARGS, *overrides)


def events(layout: RunLayout, kind: str) -> list[dict]:
    return events_of(layout, kind) if layout.storage.exists(*layout.events) else []


def rank1_node(layout: RunLayout) -> str:
    return events(layout, "workers_started")[0]["workers"][1]["node_id"]


@pytest.fixture(scope="module")
def reference(mlp_reference):
    return mlp_reference(ARGS)  # the session's uninterrupted run of this model (conftest.py)


@pytest.fixture(scope="module")
def three_node_cluster():
    """A head that runs no workers and three 1-CPU worker nodes, one of them spare."""
    cluster = helpers.multi_node_cluster(3)
    yield cluster, list(cluster.worker_nodes)
    cluster.shutdown()


def test_node_loss_moves_the_lost_rank_to_a_surviving_node(three_node_cluster, tmp_path,
                                                          reference):
    cluster, nodes = three_node_cluster
    driver = start_driver(cluster.address, tmp_path, "nodeloss",
                          "scaling.placement_strategy=SPREAD", "failure.max_restarts=2")
    layout = RunLayout(Storage(str(tmp_path)), "nodeloss")
    try:
        poll_until(lambda: any(e["step"] >= 10 for e in events(layout, "checkpoint_committed")),
                   120, "the first checkpoints")
        node_of_rank1 = rank1_node(layout)
        (victim,) = [n for n in nodes if n.node_id == node_of_rank1]
        cluster.remove_node(victim, allow_graceful=False)
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-3000:]
    (failure,) = events(layout, "failure")
    assert (failure["failure_kind"], failure["rank"]) == ("node_died", 1)
    (restart,) = events(layout, "restart")
    assert restart["replaced_ranks"] == [1]
    workers = events(layout, "workers_started")[1]["workers"]
    assert node_of_rank1 not in {w["node_id"] for w in workers}
    assert workers[0]["pid"] == events(layout, "workers_started")[0]["workers"][0]["pid"]
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_a_new_driver_resumes_the_run_of_a_killed_one(ray_cluster, tmp_path, reference):
    layout = RunLayout(Storage(str(tmp_path)), "driverloss")
    first = start_driver(ray_cluster, tmp_path, "driverloss")
    try:
        poll_until(lambda: any(e["step"] >= 15 for e in events(layout, "checkpoint_committed")),
                   120, "the first checkpoints")
        pids = [w["pid"] for w in events(layout, "workers_started")[0]["workers"]]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    # Ray ends a dead driver's actors and placement group: nothing keeps running or holding
    # resources.
    poll_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                               != psutil.STATUS_ZOMBIE for p in pids), 60, "the workers to end")
    poll_until(lambda: ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"],
               60, "the resources to return")
    candidates, _ = committed_checkpoints(layout)
    latest = candidates[0].step

    second = start_driver(ray_cluster, tmp_path, "driverloss")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    assert len(events(layout, "driver_resumed")) == 1
    assert [e["step"] for e in events(layout, "checkpoint_restored")] == [latest]
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_a_node_drain_checkpoints_at_once_and_moves_off_the_node(three_node_cluster, tmp_path,
                                                                 reference):
    """`ray drain-node --reason PREEMPTION` is the notice a cloud integration gives Ray before
    a spot VM goes: the job saves after the step in progress and leaves the node."""
    cluster, nodes = three_node_cluster
    cluster.add_node(num_cpus=1)  # the replacement the autoscaler would bring
    # No interval saves: the only checkpoints are the one the notice asks for and the last
    # step's, so the restart's step tells whether the save came at once.
    driver = start_driver(cluster.address, tmp_path, "drain",
                          "scaling.placement_strategy=SPREAD", "checkpoint.interval_steps=0")
    layout = RunLayout(Storage(str(tmp_path)), "drain")
    try:
        poll_until(lambda: events(layout, "first_step"), 120, "training to start")
        node_of_rank1 = rank1_node(layout)
        subprocess.run(["ray", "drain-node", "--address", cluster.address, "--node-id",
                        node_of_rank1, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot VM reclaimed", "--deadline-remaining-seconds",
                        "60"], check=True, capture_output=True, timeout=60)
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-3000:]
    (notice,) = events(layout, "preemption_notice")
    assert notice["ranks"] == [1] and notice["source"] == "node drain"
    (failure,) = events(layout, "failure")
    assert (failure["failure_kind"], failure["rank"]) == ("preempted", 1)
    (restart,) = events(layout, "restart")
    assert 0 < restart["from_step"] < ARGS["steps"]  # saved at once, on the notice
    workers = events(layout, "workers_started")[1]["workers"]
    assert node_of_rank1 not in {w["node_id"] for w in workers}
    assert_same_final_state(layout, reference, ARGS["steps"])


def test_a_local_storage_that_each_node_sees_apart_is_refused_at_start(tmp_path):
    """Two nodes whose workers get different folders for the same run.storage (a per-node
    variable, as a local path on a real multi-node cluster gets each node's own disk): the
    job refuses at start with exit 2, saying what to use, and restarts nothing."""
    from ray.cluster_utils import Cluster

    head_disk, other_disk = tmp_path / "head_disk", tmp_path / "other_disk"
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "env_vars": {"NODE_DISK": str(head_disk)}})
    cluster.add_node(num_cpus=1, env_vars={"NODE_DISK": str(other_disk)})
    try:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "NODE_DISK": str(head_disk)}  # the driver runs on the head
        driver = subprocess.run(
            [sys.executable, "-m", "orchestrator", "run", "--address", cluster.address,
             "--set", "run.storage=$NODE_DISK/runs", "--set", "run.name=apart",
             "--set", "workload.entrypoint=workloads.mlp:train",
             "--set", "workload.args={steps: 20, step_time_s: 0.05}",
             "--set", "scaling.num_workers=2", "--set", "scaling.placement_strategy=SPREAD"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    output = driver.stdout + driver.stderr
    assert driver.returncode == 2, output[-3000:]
    assert "is not shared by every rank" in output, output[-3000:]
    assert "use S3 or a filesystem every node mounts" in output
    layout = RunLayout(Storage(str(head_disk / "runs")), "apart")
    failures = events(layout, "failure")
    assert {f["failure_kind"] for f in failures} == {"config_error"}
    assert not events(layout, "restart") and not events(layout, "checkpoint_committed")
    nodes = {w["node_id"] for w in events(layout, "workers_started")[0]["workers"]}
    assert len(nodes) == 2
    # Nothing of the run reached the other node's disk but its worker's own probe folder,
    # emptied: no shard was ever written there.
    assert not [p for p in other_disk.rglob("*") if p.is_file()]
