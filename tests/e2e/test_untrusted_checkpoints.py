"""A checkpoint is untrusted input: whoever can write the storage can plant a pickle and
rewrite manifest.json's checksums to match. Nothing planted that way may run: `ckpt show`,
`ckpt verify`, `ckpt export` and a resumed run each refuse it, and the planted code never
runs. Tried for a `.metadata` replaced by a pickle and for a non-tensor value in a shard."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.manifest import checksum_stream
from orchestrator.checkpoint.safe_load import SafeFileSystemReader
from tests.helpers import events_of, make_config, run_job

pytestmark = pytest.mark.e2e


class Planted:
    """Unpickling this creates `path`: the stand-in for any code an attacker would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def save_dir(layout, step: int) -> Path:
    m = commit.read_manifest(layout, step)
    return Path(layout.storage.path(*layout.data_dir(step, m.data_dir)))


def rewrite_checksums(layout, step: int) -> None:
    """What an attacker with write access does next: make the manifest agree."""
    path = Path(layout.storage.path(*layout.manifest(step)))
    raw = json.loads(path.read_text())
    folder = save_dir(layout, step)
    for name in raw["files"]:
        with open(folder / name, "rb") as f:
            size, checksum = checksum_stream(f, raw["hash_algorithm"])
        raw["files"][name] = {"size": size, "checksum": checksum}
    path.write_text(json.dumps(raw))


def plant_metadata(layout, step: int, marker: Path) -> None:
    (save_dir(layout, step) / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    rewrite_checksums(layout, step)


def plant_value(layout, step: int, key: str, marker: Path) -> None:
    """Append a torch.save'd payload to a shard and point the value of `key` at it (the
    metadata itself stays legitimate DCP metadata)."""
    folder = save_dir(layout, step)
    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    (index, info), = [(i, v) for i, v in metadata.storage_data.items() if i.fqn == key]
    payload = io.BytesIO()
    torch.save(Planted(str(marker)), payload)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    info.offset, info.length = offset, len(payload.getvalue())
    metadata.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_checksums(layout, step)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


# The storage path is what these tests are about: the memory tier, on by default, would resume
# from memory instead (tests/e2e/test_memory_tier.py covers that).
def mlp_job(storage: Path, steps: int):
    return make_config(str(storage), "untrusted",
                       workload={"entrypoint": "workloads.mlp:train", "args": {"steps": steps}},
                       scaling={"num_workers": 2}, checkpoint={"interval_steps": 2, "memory_interval_steps": 0})


def test_planted_pickles_are_refused_by_every_reader_and_never_run(ray_cluster, tmp_path):
    result, layout = run_job(mlp_job(tmp_path, steps=6))
    assert result.succeeded, result.message
    marker = tmp_path / "pwned"
    plant_metadata(layout, 4, marker)
    plant_value(layout, 6, "train.step", marker)
    run_url = layout.storage.url_of(layout.run_name)

    for step, what in [(4, "refused to load checkpoint metadata that names"), (6, "refused to load the value of 'train.step'")]:
        show = run_cli("ckpt", "show", run_url, "--step", str(step))
        export = run_cli("ckpt", "export", run_url, str(tmp_path / f"out{step}.pt"),
                         "--step", str(step))
        outputs = [export] if step == 6 else [show, export]  # show reads no values
        for out in outputs:
            assert out.returncode == 1, out.stderr
            assert what in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert not (tmp_path / f"out{step}.pt").exists()
    verify = run_cli("ckpt", "verify", run_url)
    assert verify.returncode == 1
    assert "step 4: INVALID" in verify.stdout and "step 6: INVALID" in verify.stdout
    assert "step 2: ok" in verify.stdout
    assert not marker.exists()

    # The run resumed: both planted checkpoints are refused, loudly, and step 2 is restored.
    result, layout = run_job(mlp_job(tmp_path, steps=8))
    assert result.succeeded, result.message
    assert [e["step"] for e in events_of(layout, "checkpoint_refused")] == [6, 4]
    assert [e["step"] for e in events_of(layout, "checkpoint_restored")] == [2]
    assert not marker.exists()
