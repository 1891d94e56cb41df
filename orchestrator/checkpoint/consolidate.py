"""Read a whole checkpoint into one process, without a process group.

DCP stores sharded tensors (FSDP2) as pieces; this reassembles every tensor in full. Used to
compare runs, and to export a checkpoint to a single file.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from orchestrator.checkpoint.commit import read_manifest
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.describe import describe_error
from orchestrator.checkpoint.safe_load import (SafeEmptyStateDictLoadPlanner, UnsafeCheckpointError,
                                                is_refusal)
from orchestrator.errors import CheckpointError
from orchestrator.checkpoint.writer import reader


def load_full_state(layout: RunLayout, step: int) -> dict[str, Any]:
    """The committed checkpoint of `step` as a nested dict of full tensors and plain values.
    Nothing in it is unpickled but through the allow-lists of checkpoint/safe_load.py."""
    manifest = read_manifest(layout, step)
    state: dict[str, Any] = {}
    storage_reader = reader(layout, step, manifest.data_dir)
    # Read here first: inside DCP's load a refused metadata file would only be one cause in
    # an AssertionError about "rank local metadata".
    storage_reader.read_metadata()
    try:
        _load_state_dict(state, storage_reader=storage_reader,
                         planner=SafeEmptyStateDictLoadPlanner(), no_dist=True)
    except CheckpointException as e:  # a BaseException: say what failed, in one line
        if is_refusal(e):
            raise next(exc for exc, *_ in e.failures.values()
                       if isinstance(exc, UnsafeCheckpointError)) from None
        raise CheckpointError(f"step {step} cannot be loaded: {describe_error(e)}") from None
    return state


def unsafe_content(layout: RunLayout, step: int, data_dir: str) -> str:
    """Why the save of `step` cannot be loaded safely ("" if it can): its metadata through
    the allow-list, and every non-tensor value with `weights_only=True`. Reads the metadata
    and the small values only, not the tensors."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage_reader = reader(layout, step, data_dir)
    try:
        metadata = storage_reader.read_metadata()
        values = {k for k, v in metadata.state_dict_metadata.items()
                  if isinstance(v, BytesStorageMetadata)}
        if values:
            _load_state_dict({}, storage_reader=storage_reader,
                             planner=SafeEmptyStateDictLoadPlanner(keys=values), no_dist=True)
    except UnsafeCheckpointError as e:
        return str(e)
    except CheckpointException as e:
        if is_refusal(e):
            return "; ".join(str(exc) for exc, *_ in e.failures.values())
        raise CheckpointError(f"step {step} cannot be loaded: {describe_error(e)}") from None
    return ""
