"""One exception hierarchy for everything the orchestrator raises at its edges.

Each class names the scenario it stands for; each message names the setting to change.
"""


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class ConfigError(OrchestratorError, ValueError):
    """The job's configuration is wrong: an unknown key, a value of the wrong type or range.

    Raised before anything starts; the CLI turns it into exit code 2 and one line.
    """


class StorageError(OrchestratorError):
    """The run's storage cannot be read or written (missing bucket, no permission, full disk)."""


class StorageFailure(StorageError):
    """A save could not be written or committed because of its storage (ENOSPC, EACCES,
    S3 errors after retries), or no committed checkpoint can be read at a restore.

    Raised on every rank at the same step; the driver classifies it as a `storage_error`,
    which has its own restart budget (`failure.max_storage_errors`).
    """


class SavesKeepFailing(StorageFailure):
    """`checkpoint.max_failed_saves` saves in a row failed: the job stops rather than train
    on with nothing committed."""


class StorageNotShared(StorageError):
    """The ranks do not all reach the same storage: a local `run.storage` on a multi-node
    cluster, where each node writes to its own disk. Found by the workers' start-up probe
    (checkpoint/storage_probe.py); the job stops at once with exit 2, like a bad config."""


class CheckpointError(OrchestratorError):
    """A checkpoint cannot be written or restored (already committed step, no valid checkpoint)."""


class DatasetError(OrchestratorError, ValueError):
    """The training data cannot be used as it is: a shard missing or unreadable, a schema or
    a checksum that differs from the dataset's manifest, a resume on other data.

    Found before training starts where it can be (the CLI's preflight: exit 2, one line
    naming the file), else raised in the worker that read the file.
    """


class PlacementError(OrchestratorError):
    """The cluster cannot place the worker gang within `scaling.placement_timeout_s`."""


class JobFailed(OrchestratorError):
    """The job stopped for good: the failure policy said STOP. The message lists the failures."""
