"""Read a whole checkpoint into one process, without a process group.

DCP stores sharded tensors (FSDP2) as pieces; this reassembles every tensor in full. Used to
compare runs, and to export a checkpoint to a single file.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from orchestrator.checkpoint.commit import read_manifest
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.writer import reader


def load_full_state(layout: RunLayout, step: int) -> dict[str, Any]:
    """The committed checkpoint of `step` as a nested dict of full tensors and plain values."""
    manifest = read_manifest(layout, step)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader(layout, step, manifest.data_dir),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
