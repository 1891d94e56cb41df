"""cluster.yaml passes Ray's own cluster-config validation, as `ray up` runs it
(`prepare_config`, then `validate_config`), and holds what this orchestrator needs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_cluster_config_as_ray_up_does(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_ray_would_refuse_a_broken_one(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_spot"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_a_cpu_head_and_gpu_workers_on_demand_and_on_spot(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert "GPU" not in head["resources"]  # training workers never land beside the driver
    on_demand, spot = types["gpu_on_demand"], types["gpu_spot"]
    assert on_demand["resources"]["GPU"] >= 1 and spot["resources"]["GPU"] >= 1
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for t in (on_demand, spot):
        assert 0 <= t["min_workers"] <= t["max_workers"]


def test_it_installs_the_project_with_the_token_and_the_health_checks_we_rely_on(cluster):
    assert any("pip install -e /home/ubuntu/orchestrator" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["/home/ubuntu/orchestrator"] == "."
    assert "/home/ubuntu/.ray/auth_token" in cluster["file_mounts"]
    head = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(
        cluster["worker_start_ray_commands"])
    assert "RAY_health_check_period_ms=1000" in head
    assert "RAY_health_check_failure_threshold=5" in head
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard`, not the net
