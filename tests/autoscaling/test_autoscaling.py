"""Jobs on a cluster that autoscales (ray.cluster_utils.AutoscalingCluster: a head with no
CPUs, one worker node type of 1 CPU, at least 1 and at most 3 nodes, idle nodes removed
after 6 s). Its start() and shutdown() run `ray stop --force`, which ends every Ray process
on the machine: these tests run in a pytest process of their own, started by
tests/e2e/test_autoscaling_process.py once no other Ray runs here, never beside another Ray.

- an elastic job that starts before the cluster has room for all its workers begins with
  what fits and grows when the autoscaler adds a node;
- a job asking for more workers than there are nodes makes the cluster scale up, and trains;
  a node killed under it is replaced by the autoscaler, and the job resumes and completes
  (that a lost node's job ends with an uninterrupted run's weights: tests/e2e/test_cluster.py);
- after the jobs no placement group, actor or resource request of theirs is left, and the
  cluster scales back down to its minimum.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray

from orchestrator.chaos import FaultPlan
from tests.helpers import events_of, make_config, poll_until, run_job

pytestmark = pytest.mark.skipif(os.environ.get("ORCHESTRATOR_OWN_RAY_PROCESS") != "1",
                                reason="runs in a process of its own "
                                       "(tests/e2e/test_autoscaling_process.py)")

MIN_NODES, MAX_NODES = 1, 3
ARGS = {"steps": 120, "step_time_s": 0.05}


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class Local(AutoscalingCluster):
        """AutoscalingCluster with its base config given here: the Ray wheel leaves out the
        fake_multi_node/example.yaml it reads (the same keys as that file)."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            assert not autoscaler_v2
            return {
                "cluster_name": "fake_multinode", "max_workers": MAX_NODES,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True,
                             "disable_launch_config_check": True},
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": head_resources, "node_config": {},
                                         "max_workers": 0}},
                "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
                "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [],
                "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
                "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [],
                "rsync_filter": [], **config_kwargs}

    return Local


def LocalAutoscalingCluster(**kwargs):
    return _autoscaling_cluster_class()(**kwargs)


def worker_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


@pytest.fixture(scope="module")
def autoscaling_cluster():
    others = [p.pid for p in psutil.process_iter(["name"])
              if p.info["name"] in ("raylet", "gcs_server")]
    assert not others, (f"another Ray runs on this machine (pids {others}); "
                        "AutoscalingCluster would stop it: not started")
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0},
        worker_node_types={"cpu_node": {"resources": {"CPU": 1}, "node_config": {},
                                        "min_workers": MIN_NODES, "max_workers": MAX_NODES}},
        idle_timeout_minutes=0.1)
    # A lost node is declared dead within about a second, as on preemptible machines.
    cluster.start(_system_config={"health_check_period_ms": 500,
                                  "health_check_failure_threshold": 2,
                                  "health_check_timeout_ms": 500})
    try:
        ray.init("auto")
        poll_until(lambda: len(worker_nodes()) >= MIN_NODES, 120, "the minimum node")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def mlp_job(storage, name, plan: FaultPlan | None = None, args=ARGS, **scaling):
    return make_config(str(storage), name,
                       workload={"entrypoint": "workloads.mlp:train", "args": args},
                       scaling={"num_workers": 2, **scaling},
                       checkpoint={"interval_steps": 5},
                       failure={"max_restarts": 5, "failure_grace_s": 0.5,
                                "backoff_initial_s": 0},
                       chaos=(plan or FaultPlan()).config())


def test_an_elastic_job_begins_with_what_fits_and_grows_when_a_node_is_added(
        autoscaling_cluster, tmp_path):
    assert len(worker_nodes()) == MIN_NODES  # room for 1 of the 2 workers
    # The full gang waits 1 s, less than a new node takes to start: it begins with one.
    # Long enough (15 s of steps) for the added node to come up (3-5 s here, more on a
    # loaded machine) while the job still runs.
    args = {**ARGS, "steps": 300}
    result, layout = run_job(mlp_job(tmp_path, "elastic", args=args, min_workers=1,
                                     placement_timeout_s=1))
    assert result.succeeded, result.message
    (small,) = events_of(layout, "elastic_world_size")
    assert small["world_size"] == 1
    assert len(events_of(layout, "grow_requested")) == 1 and len(events_of(layout, "resize")) == 1
    started = events_of(layout, "workers_started")
    assert [len(e["workers"]) for e in started] == [1, 2]
    assert len({w["node_id"] for w in started[-1]["workers"]}) == 2  # on the added node too
    assert result.summary["steps_completed"] == args["steps"]


def test_a_job_scales_the_cluster_up_and_a_killed_node_is_replaced(autoscaling_cluster,
                                                                    tmp_path):
    poll_until(lambda: len(worker_nodes()) == MIN_NODES, 120, "the cluster to scale down")
    nodes_before = {n["NodeID"] for n in worker_nodes()}
    plan = FaultPlan().kill_node_at(rank=1, step=60)
    result, layout = run_job(mlp_job(tmp_path, "scaled", plan))
    assert result.succeeded, result.message
    first, second = events_of(layout, "workers_started")
    first_nodes = {w["node_id"] for w in first["workers"]}
    assert len(first_nodes) == 2 and first_nodes - nodes_before  # scaled up for the gang
    (fired,) = events_of(layout, "fault_fired")
    assert fired["fault_kind"] == "kill_node"
    assert any(f["rank"] == 1 for f in events_of(layout, "failure"))
    killed = first["workers"][1]["node_id"]
    replacement = second["workers"][1]["node_id"]
    assert replacement not in first_nodes | nodes_before  # a node the autoscaler added
    assert killed not in {n["NodeID"] for n in worker_nodes()}
    assert result.summary["steps_completed"] == ARGS["steps"]


def test_after_the_jobs_nothing_of_theirs_keeps_the_cluster_from_scaling_down(
        autoscaling_cluster):
    from ray.util.state import list_actors, list_placement_groups

    assert not [a for a in list_actors() if a.state == "ALIVE"]
    assert not [p for p in list_placement_groups() if p.state != "REMOVED"]
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    request = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    assert request in (None, b"[]"), request  # the elastic job's request was withdrawn
    t0 = time.monotonic()
    poll_until(lambda: len(worker_nodes()) == MIN_NODES, 180,
               "the cluster to scale back down to its minimum")
    print(f"scaled down to {MIN_NODES} node(s) in {time.monotonic() - t0:.0f}s")
