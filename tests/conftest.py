"""Shared fixtures. Environment first: Ray reads these when it is imported.

- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray process on loopback;
- RAY_AUTH_MODE=disabled, set explicitly so that subprocess clients of the test cluster do not
  depend on a token an earlier run left in the home directory.
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that can share it (ray.init costs ~5 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
