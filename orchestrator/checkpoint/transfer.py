"""Moving weights in and out of a run: export a checkpoint to one file, import one file as the
initial weights of a run.

An export is consolidated (full tensors, whatever the world size and parallelism that saved
it). An import is written as a committed checkpoint of step 0 that holds the model only (its
manifest's `parts` says so): the run's first restore loads the weights and leaves the
optimizer, the step and the data position fresh.
"""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import orchestrator
from orchestrator.checkpoint import commit
from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.layout import SAVE_DIR_PREFIX, RunLayout
from orchestrator.checkpoint.manifest import Manifest
from orchestrator.checkpoint.writer import hashing_writer
from orchestrator.errors import CheckpointError

STATE_KEY = "train"
"""Where the workloads' TrainState lives in the saved state (`{"train": state}`)."""
FORMATS = ("safetensors", "torch")


def export(layout: RunLayout, step: int, out: Path, fmt: str, with_optimizer: bool,
           key: str = STATE_KEY) -> dict[str, Any]:
    """Write step `step` of the run to one file; return what was written."""
    full = load_full_state(layout, step)
    if key not in full or "model" not in full[key]:
        raise CheckpointError(f"step {step} has no '{key}.model' state to export "
                              f"(top-level keys: {', '.join(sorted(full))})")
    model = {k: _plain(v) for k, v in full[key]["model"].items()}
    optimizer = full[key].get("optimizer", {}) if with_optimizer else None
    manifest = commit.read_manifest(layout, step)
    info = {"step": step, "metrics": manifest.metrics, "world_size": manifest.world_size,
            "parallelism": manifest.parallelism}
    if fmt == "torch":
        body: dict[str, Any] = {"model": model, **info}
        if optimizer is not None:
            body["optimizer"] = optimizer
        torch.save(body if optimizer is not None else model, out)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = dict(model) if optimizer is None else {f"model.{k}": v for k, v in model.items()}
        extra: dict[str, Any] = {}
        if optimizer is not None:
            for name, value in _flat(optimizer, "optimizer."):
                if isinstance(value, torch.Tensor):
                    tensors[name] = _plain(value)
                else:
                    extra[name] = value
        metadata = {"orchestrator": json.dumps(info)}
        if extra:
            metadata["optimizer_values"] = json.dumps(extra, default=str)
        save_file(tensors, str(out), metadata=metadata)
    else:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    return {"step": step, "tensors": len(model), "bytes": out.stat().st_size,
            "with_optimizer": with_optimizer}


def import_weights(source: Path, layout: RunLayout, key: str = STATE_KEY) -> Manifest:
    """Write the state dict in `source` as the run's step-0 checkpoint (model only)."""
    candidates, _ = commit.committed_checkpoints(layout)
    if candidates or layout.step_dirs():
        have = ", ".join(str(c.step) for c in candidates) or "uncommitted folders"
        raise CheckpointError(
            f"{layout.storage.url_of(layout.run_name)} already has checkpoints ({have}); "
            "import into a new run name")
    model = read_state_dict(source)
    data_dir = f"{SAVE_DIR_PREFIX}import-{uuid.uuid4().hex[:8]}"
    writer = hashing_writer(layout, 0, data_dir)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({key: {"model": model}}, storage_writer=writer, no_dist=True)
    manifest = Manifest(step=0, world_size=1, parallelism="import", data_dir=data_dir,
                        files=dict(writer.fs.written), parts=[f"{key}.model"],
                        metrics={}, torch_version=torch.__version__,
                        orchestrator_version=orchestrator.__version__)
    commit.write_manifest(layout, manifest)
    return manifest


def read_state_dict(source: Path) -> dict[str, torch.Tensor]:
    """A model state dict from a safetensors or torch file; `module.` (DDP) prefixes go."""
    if not source.exists():
        raise CheckpointError(f"{source}: no such file")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: Any = load_file(str(source))
    else:
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same message
            raise CheckpointError(f"{source}: not a safetensors or torch state dict ({e})") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # an export made with --with-optimizer
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{source}: expected a state dict of tensors")
    return {k.removeprefix("module."): v.contiguous() for k, v in loaded.items()}


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views that share storage; exported tensors are standalone.
    return t.detach().contiguous().clone()


def _flat(tree: dict[str, Any], prefix: str):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
