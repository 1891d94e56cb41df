"""`orchestrator ckpt ...` as users run it (a real process), on local disk and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.local_gang import run_gang
from tests.integration import ckpt_scenarios as sc

FIXTURE = Path(__file__).parents[1] / "fixtures" / "format_v1" / "v1run"


def ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "ckpt", *args],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def upload(run_url: str) -> RunLayout:
    """The format-1 fixture run (steps 2 and 4, two DDP ranks), copied to `run_url`."""
    storage_url, name = run_url.rsplit("/", 1)
    layout = RunLayout(Storage(storage_url), name)
    for path in FIXTURE.rglob("*"):
        if path.is_file():
            layout.storage.write_atomic(path.read_bytes(), name,
                                        *path.relative_to(FIXTURE).parts)
    return layout


def test_ls_show_verify_gc_on_a_run(storage_url):
    run_url = f"{storage_url}/v1run"
    layout = upload(run_url)
    # Debris: an interrupted save of step 6.
    layout.storage.write_atomic(b"half", *layout.data_dir(6, "save-x"), "__0_0.distcp")

    out = ckpt("ls", run_url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["STEP", "COMMITTED", "SIZE", "METRICS", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [["2", "yes"], ["4", "yes"], ["6", "no"]]
    assert "loss=0.5594" in lines[1]
    rows = json.loads(ckpt("ls", run_url, "--json").stdout)
    assert [(r["step"], r["committed"]) for r in rows] == [(2, "yes"), (4, "yes"),
                                                           (6, "no (debris)")]
    assert rows[1]["bytes"] == 113641 and rows[1]["world_size"] == 2

    shown = json.loads(ckpt("show", run_url, "--json").stdout)
    assert shown["step"] == 4 and shown["tensors"]["train.model.0.weight"]["shape"] == [8, 8]
    assert shown["format_version"] == 1 and shown["hash_algorithm"] == "crc32"

    out = ckpt("verify", run_url)
    assert out.returncode == 0 and "step 2: ok" in out.stdout and "step 4: ok" in out.stdout

    # One flipped byte in step 4: verify names the file and fails.
    manifest = commit.read_manifest(layout, 4)
    data = bytearray(layout.storage.read_bytes(*layout.step_dir(4), "__1_0.distcp"))
    data[100] ^= 1
    layout.storage.write_atomic(bytes(data), *layout.step_dir(4), "__1_0.distcp")
    out = ckpt("verify", run_url)
    assert out.returncode == 1 and "step 4: INVALID" in out.stdout
    assert "__1_0.distcp" in out.stdout and "step 2: ok" in out.stdout
    assert manifest.files["__1_0.distcp"].checksum in out.stdout

    # gc leaves fresh debris alone by default (a save may be in flight), removes it when old.
    out = ckpt("gc", run_url)
    assert out.returncode == 0 and "0 item(s) removed" in out.stdout
    assert 6 in layout.step_dirs()
    out = ckpt("gc", run_url, "--min-age-s", "0")
    assert "removing checkpoints/step_000000006: no manifest" in out.stdout
    assert layout.step_dirs() == [2, 4]


def test_bad_input_is_one_clear_line(storage_url, tmp_path):
    out = ckpt("ls", f"{storage_url}/nothing-here")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("orchestrator: no checkpoints in ")
    assert out.stderr.strip().endswith("/nothing-here") and len(out.stderr.splitlines()) == 1
    out = ckpt("verify", f"{storage_url}/nothing-here")
    assert out.returncode == 1 and "no committed checkpoints" in out.stderr
    run_url = f"{storage_url}/v1run"
    upload(run_url)
    out = ckpt("export", run_url, str(tmp_path / "x.pt"), "--step", "3")
    assert out.returncode == 1 and "committed steps: 2, 4" in out.stderr
    out = ckpt("ls", "just-a-name")
    assert out.returncode == 2 and "<storage>/<run name>" in out.stderr


def test_export_then_import_as_the_initial_weights_of_a_new_run(s3_bucket, tmp_path):
    # On S3 only: the local path is the same code with another fsspec filesystem, and each
    # variant costs 20 s of two jobs.
    storage_url = s3_bucket + "/storage"
    run_url = f"{storage_url}/v1run"
    layout = upload(run_url)
    full = load_full_state(layout, 4)["train"]
    for name, extra in [("model.safetensors", []), ("model.pt", []),
                        ("both.pt", ["--with-optimizer"])]:
        out = ckpt("export", run_url, str(tmp_path / name), *extra)
        assert out.returncode == 0, out.stderr
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == full["model"].keys()
    assert all(torch.equal(exported[k], full["model"][k]) for k in exported)
    torch_export = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(torch_export[k], full["model"][k]) for k in exported)
    both = torch.load(tmp_path / "both.pt")
    assert both["step"] == 4 and "state" in both["optimizer"]

    # Weights of the scenario's model, saved as a plain torch state dict (as from DDP).
    torch.manual_seed(7)
    weights = {"module.0.weight": torch.randn(16, 8), "module.0.bias": torch.randn(16),
               "module.2.weight": torch.randn(1, 16), "module.2.bias": torch.randn(1)}
    torch.save(weights, tmp_path / "weights.pt")
    new_url = f"{storage_url}/{sc.RUN}"
    out = ckpt("import", str(tmp_path / "weights.pt"), new_url)
    assert out.returncode == 0, out.stderr
    again = ckpt("import", str(tmp_path / "weights.pt"), new_url)
    assert again.returncode == 1 and "already has checkpoints" in again.stderr
    result = run_gang(sc.restore_imported, 2, storage_url, out_dir=str(tmp_path))[0]
    assert result["step"] == 0 and result["largest_moment"] == 0.0
    assert result["model"].keys() == {
        k.removeprefix("module.") for k in weights}
    for k, v in weights.items():
        assert torch.equal(result["model"][k.removeprefix("module.")], v)
    (restored,) = [e for e in result["events"] if e["kind"] == "checkpoint_restored"]
    assert restored["parts"] == ["train.model"]
