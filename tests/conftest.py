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

# tests/autoscaling stops every Ray on the machine: it runs only in a process of its own,
# which tests/e2e/test_autoscaling_process.py starts last.
collect_ignore = [] if os.environ.get("ORCHESTRATOR_OWN_RAY_PROCESS") == "1" else ["autoscaling"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that can share it (ray.init costs ~5 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def mlp_reference(ray_cluster, tmp_path_factory):
    """`mlp_reference(args, num_workers=2)`: the layout of an uninterrupted run of
    workloads.mlp with these workload args, made once per session and shared by every test
    whose run trains the same model. Its `step_time_s` only sleeps, so the reference runs
    without it; the checkpoint interval and the other settings do not change the final
    state either (that is what the tests that compare against it check)."""
    import json

    from tests.helpers import make_config, run_job

    made = {}

    def get(args: dict, num_workers: int = 2):
        trained = {k: v for k, v in args.items() if k != "step_time_s"}
        key = (json.dumps(trained, sort_keys=True), num_workers)
        if key not in made:
            config = make_config(str(tmp_path_factory.mktemp("mlp-ref")), "ref",
                                 workload={"entrypoint": "workloads.mlp:train", "args": trained},
                                 scaling={"num_workers": num_workers},
                                 checkpoint={"interval_steps": 5})
            result, layout = run_job(config)
            assert result.succeeded and result.summary["restarts"] == 0, result.message
            made[key] = layout
        return made[key]

    return get


# --- S3: a real S3-protocol server on loopback ----------------------------------------------
# The endpoint is fixed now, before anything reads the environment, so that every process the
# tests start (gang processes, Ray workers) reaches the same server the usual AWS way.
import socket  # noqa: E402
import uuid  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
S3_SECRET = "test-secret-" + uuid.uuid4().hex  # unique: tests grep logs for it
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
})


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session (as s3fs's own tests do)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def storage_url(request, tmp_path):
    """Each checkpoint feature runs on local disk and on S3."""
    if request.param == "local":
        return str(tmp_path / "storage")
    return request.getfixturevalue("s3_bucket") + "/storage"


# --- a disk that really fills up ---------------------------------------------------------


@pytest.fixture
def mount_small_disk():
    """`mount_small_disk(folder)` mounts a 16 MiB tmpfs of this test's own on `folder`
    (created), so that filling it is a real ENOSPC from the kernel; unmounted at the end."""
    import subprocess

    mounted = []

    def mount(folder) -> str:
        os.makedirs(folder, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(str(folder))
        return str(folder)

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", folder], check=False)


# --- tests that need the machine's Ray to themselves ---------------------------------------


def pytest_collection_modifyitems(config, items):
    """`own_ray` tests run last: they stop this session's Ray, and must not be followed by a
    test that needs it."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)
