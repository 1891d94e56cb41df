"""Helpers for tests: building configs, running jobs in-process, comparing checkpoints."""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.config import JobConfig, from_dict
from orchestrator.events import read_events


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
