"""Read a whole checkpoint into one process, without a process group.

DCP stores sharded tensors (FSDP2) as pieces; this reassembles every tensor in full. Used to
compare runs, and to export a checkpoint to a single file.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from orchestrator.checkpoint.layout import RunLayout


def load_full_state(layout: RunLayout, step: int) -> dict[str, Any]:
    """The checkpoint of `step` as a nested dict of full tensors and plain values."""
    storage = layout.storage
    if storage.is_local:
        reader = FileSystemReader(storage.path(*layout.step_dir(step)))
    else:
        reader = FsspecReader(storage.url_of(*layout.step_dir(step)))
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state
