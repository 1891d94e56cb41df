"""What a failed save calls for, and which errors are the storage's: pure functions."""

import errno

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from orchestrator.checkpoint.save_failures import AfterFailedSave, after_failed_save, explain, is_storage_error
from orchestrator.config import CheckpointConfig
from orchestrator.errors import StorageError


@pytest.mark.parametrize("cfg, in_row, action", [
    ({}, 1, AfterFailedSave.CONTINUE),
    ({}, 2, AfterFailedSave.CONTINUE),
    ({}, 3, AfterFailedSave.STOP),  # the default max_failed_saves is 3
    ({"max_failed_saves": 1}, 1, AfterFailedSave.STOP),
    ({"on_save_error": "stop"}, 1, AfterFailedSave.RESTART),
    ({"on_save_error": "stop", "max_failed_saves": 1}, 1, AfterFailedSave.RESTART),
])
def test_on_save_error_and_max_failed_saves(cfg, in_row, action):
    config = CheckpointConfig(**cfg)
    assert after_failed_save(in_row, config) is action
    line = explain(action, 8, in_row, "OSError: disk full", config)
    assert "step 8" in line and "disk full" in line
    assert ("checkpoint.max_failed_saves" in line) == (action is not AfterFailedSave.RESTART)


def wrapped(error: BaseException) -> CheckpointException:
    return CheckpointException("save failed", {1: (error, None)})


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (PermissionError(errno.EACCES, "Forbidden"), True),
    (wrapped(OSError(errno.EIO, "I/O error")), True),  # a peer's error, as DCP gathers it
    (StorageError("rank 0 cannot see the files"), True),
    (RuntimeError("a bug in state_dict"), False),
    (wrapped(KeyError("model")), False),
])
def test_which_failed_saves_are_the_storages(error, expected):
    assert is_storage_error(error) is expected


def test_an_error_caused_by_a_storage_error_is_one():
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("write failed") from e
    except RuntimeError as e:
        assert is_storage_error(e)


def test_a_botocore_error_is_the_storages():
    from botocore.exceptions import ClientError

    assert is_storage_error(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))
