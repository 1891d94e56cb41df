"""Nothing read from a checkpoint runs code, and no name read from one leaves its folder."""

import io
import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                   MetadataIndex)

from orchestrator.checkpoint.restore import RankRng
from orchestrator.checkpoint.manifest import Manifest, ManifestError
from orchestrator.checkpoint.safe_load import (UnsafeCheckpointError, legacy_rng_state,
                                               load_metadata, load_value)


class Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def metadata_with(path: str) -> bytes:
    return pickle.dumps(Metadata(state_dict_metadata={"a": BytesStorageMetadata()},
                                 storage_data={MetadataIndex("a"): _StorageInfo(path, 0, 1)}))


def test_dcp_metadata_loads_and_anything_else_is_refused():
    assert isinstance(load_metadata(io.BytesIO(metadata_with("__0_0.distcp")), "m"), Metadata)
    for data in (pickle.dumps(Planted()), pickle.dumps({"a": 1}), b"not a pickle", b""):
        with pytest.raises(UnsafeCheckpointError, match="^m: "):
            load_metadata(io.BytesIO(data), "m")


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a/b.distcp", "..", ""])
def test_metadata_naming_a_shard_outside_its_folder_is_refused(path):
    with pytest.raises(UnsafeCheckpointError, match="not a plain file name"):
        load_metadata(io.BytesIO(metadata_with(path)), "m")


def test_values_load_with_weights_only():
    for value in (7, [0.1, 0.2], {"last_epoch": 3, "verbose": False}, None):
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        assert load_value(buf, "k") == value
    buf = io.BytesIO()
    torch.save(Planted(), buf)
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match="value of 'train.step'"):
        load_value(buf, "train.step")


def test_rng_state_round_trips_as_tensors_and_old_pickled_states_still_load():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # a cached gaussian is part of the state
    state = RankRng().state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    want = (random.random(), random.gauss(0, 1), np.random.normal(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    RankRng().load_state_dict(state)
    got = (random.random(), random.gauss(0, 1), np.random.normal(), torch.rand(2))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])

    old = {"torch": torch.get_rng_state(),
           "python_numpy": pickle.dumps((random.getstate(), np.random.get_state()))}
    want = (random.random(), np.random.normal())
    RankRng(legacy=True).load_state_dict(old)
    assert (random.random(), np.random.normal()) == want
    with pytest.raises(UnsafeCheckpointError, match="refused to load an RNG state that names"):
        legacy_rng_state(pickle.dumps(Planted()))


MANIFEST = {"format_version": 2, "step": 4, "world_size": 2, "parallelism": "ddp",
            "data_dir": "save-123", "files": {".metadata": {"size": 1, "checksum": "0"},
                                               "__0_0.distcp": {"size": 1, "checksum": "0"}},
            "metrics": {}, "parts": [], "hash_algorithm": "xxh3_64"}


def test_a_manifest_with_ordinary_names_parses():
    assert Manifest.from_json(json.dumps(MANIFEST).encode()).data_dir == "save-123"


@pytest.mark.parametrize("change", [
    {"data_dir": "../../elsewhere"}, {"data_dir": "/abs"}, {"data_dir": "save-1/../.."},
    {"data_dir": 5},
    {"files": {"../../x": {"size": 1, "checksum": "0"}}},
    {"files": {"/etc/passwd": {"size": 1, "checksum": "0"}}},
    {"files": {"a/b": {"size": 1, "checksum": "0"}}},
    {"files": {"..": {"size": 1, "checksum": "0"}}},
])
def test_a_manifest_naming_paths_outside_the_save_is_refused(change):
    with pytest.raises(ManifestError, match="not a"):
        Manifest.from_json(json.dumps({**MANIFEST, **change}).encode())
