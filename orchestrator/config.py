"""The job's configuration: one typed dataclass tree, loaded from YAML, validated at the edge.

Every section validates itself in `__post_init__`; `load_config` rejects unknown keys and values
of the wrong type with a `ConfigError` whose one-line message names the key and what is allowed.
Nothing here reads the environment: the CLI is the only entry point that does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.chaos.config import ChaosConfig
from orchestrator.config_checks import _require, _seconds, _short
from orchestrator.errors import ConfigError
from orchestrator.yaml_input import parse_yaml, read_yaml_file

# Storage schemes we support and test. Anything else is refused before the job starts rather
# than failing minutes later inside a worker.
STORAGE_SCHEMES = ("file", "s3", "memory")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# S3's own rule for bucket names (3-63 lower-case letters, digits, '.', '-').
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_WORKERS = 100_000
"""More ranks than any cluster this runs on: a larger number is a typo, refused at once
rather than waiting `scaling.placement_timeout_s` for a gang that cannot be placed."""
def check_storage_url(url: str, key: str = "run.storage") -> None:
    """A local path, or a URL of a scheme we support that names a place: `s3://` alone
    would otherwise become a local folder named `s3:`."""
    _require(isinstance(url, str) and url.strip() != "", key, "give a local path or a URL",
             url)
    if "://" not in url:
        return
    scheme, rest = url.split("://", 1)
    _require(scheme in STORAGE_SCHEMES, key,
             f"the URL scheme must be one of {', '.join(STORAGE_SCHEMES)}, "
             "or give a local path", url)
    if scheme == "s3":
        bucket = rest.split("/", 1)[0]
        _require(bool(_BUCKET.match(bucket)), key,
                 "write it as s3://BUCKET/PREFIX with a valid bucket name", url)
    else:
        _require(rest.strip("/") != "", key, f"write it as {scheme}://PATH", url)


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    name: str = "demo"
    """Name of the run; a second `orchestrator run` with the same name and storage resumes it."""
    storage: str = "./runs"
    """Where checkpoints and the event log go: a local path or an fsspec URL (file://, s3://).
    Every rank must reach the same storage (S3, or a filesystem shared by every node): the
    workers check this at the start of each attempt. A local path may name environment
    variables ($VAR, ${VAR}); each process expands them in its own environment."""
    lease_timeout_s: float = 30.0
    """The driver holds the run through a lease in its storage, renewed every third of this;
    a second driver of the run is refused while it is held. After a driver dies, the next one
    takes over at once if the dead one ran on its host, else once this has passed."""

    def __post_init__(self) -> None:
        _seconds("run.lease_timeout_s", self.lease_timeout_s, minimum=1)
        _require(
            isinstance(self.name, str) and bool(_RUN_NAME.match(self.name)),
            "run.name", "use up to 128 letters, digits, '.', '_' and '-'", self.name,
        )
        check_storage_url(self.storage)

    @property
    def storage_url(self) -> str:
        """The storage as an absolute URL or path, so workers on other cwd's agree on it.
        Environment variables stay as written: each process expands them (Storage)."""
        if "://" in self.storage or "$" in self.storage:
            return self.storage.rstrip("/")
        return str(Path(self.storage).expanduser().resolve())


@dataclass(kw_only=True, frozen=True)
class WorkloadConfig:
    entrypoint: str = "workloads.gpt:train"
    """`module:function` of the training function; it is called with a TrainContext."""
    args: dict[str, Any] = field(default_factory=dict)
    """Arguments handed to the workload as `ctx.args`; the workload validates them."""

    def __post_init__(self) -> None:
        module, sep, func = str(self.entrypoint).partition(":")
        _require(bool(sep and _MODULE.match(module) and func.isidentifier()),
                 "workload.entrypoint",
                 "write it as 'package.module:function' (absolute, no relative import)",
                 self.entrypoint)
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package
            found = False
        _require(found, "workload.entrypoint",
                 f"module {module!r} cannot be imported here", self.entrypoint)


@dataclass(kw_only=True, frozen=True)
class ScalingConfig:
    num_workers: int = 2
    """Number of training workers (the world size)."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources each worker reserves; a positive GPU count selects NCCL and CUDA."""
    placement_strategy: str = "PACK"
    """Ray placement-group strategy for the gang: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    placement_timeout_s: float = 120.0
    """How long to wait for the cluster to place every worker before giving up (or, with
    `min_workers`, before resuming with fewer)."""
    spare_workers: int = 0
    """Warm spare workers (started, torch imported, resources held) that take over a lost
    rank at once instead of a new process being started."""
    standby_workers: int = 1
    """Warm standby processes that hold no resources (torch and the workload imported, idle):
    a lost rank is taken over by a standby on its node, in the bundle the lost worker freed,
    instead of a new process being started. They are spread over the gang's ranks' nodes in
    rank order: one per node the gang spans covers every rank. CPU workers only (a GPU is
    assigned by Ray when a process starts); costs the memory of one idle process each."""
    min_workers: int = 0
    """Elastic: when fewer than num_workers can be placed, resume with as few as this many
    (resharding the checkpoint), and grow back at a checkpoint when resources return.
    0 means num_workers: no elasticity."""

    def __post_init__(self) -> None:
        _require(1 <= self.num_workers <= MAX_WORKERS, "scaling.num_workers",
                 f"it must be between 1 and {MAX_WORKERS}", self.num_workers)
        for name, amount in self.resources_per_worker.items():
            _require(isinstance(amount, (int, float)) and not isinstance(amount, bool)
                     and math.isfinite(amount) and 0 <= amount <= 1e6,
                     f"scaling.resources_per_worker.{name}",
                     "it must be a number between 0 and 1e6", amount)
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        _require(self.placement_strategy in strategies, "scaling.placement_strategy",
                 f"use one of {', '.join(strategies)}", self.placement_strategy)
        _seconds("scaling.placement_timeout_s", self.placement_timeout_s, zero_ok=False)
        _require(0 <= self.spare_workers <= MAX_WORKERS, "scaling.spare_workers",
                 f"it must be between 0 and {MAX_WORKERS}", self.spare_workers)
        _require(0 <= self.standby_workers <= MAX_WORKERS, "scaling.standby_workers",
                 f"it must be between 0 and {MAX_WORKERS}", self.standby_workers)
        _require(0 <= self.min_workers <= self.num_workers, "scaling.min_workers",
                 f"it must be between 0 and scaling.num_workers={self.num_workers}",
                 self.min_workers)

    @property
    def smallest_world(self) -> int:
        return self.min_workers or self.num_workers

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0


ASYNC_MODES = ("off", "thread", "process")
SAVE_ERROR_ACTIONS = ("continue", "stop")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    interval_steps: int = 10
    """Save every this many steps; 0 turns step-based saving off. The last step always saves."""
    interval_s: float = 0.0
    """Also save when this many seconds have passed since the last save; 0 turns it off."""
    memory_interval_steps: int | str = "auto"
    """Keep the state of every this many steps in host memory, with a copy of each rank's on
    its neighbour in the ring (the memory tier, checkpoint/memory.py), so that a restart
    resumes from it instead of the latest storage checkpoint when the gang still holds it
    whole; 0 turns it off. `auto`: as often as the copies cost at most 5% of the training
    time, measured by the ranks at the start of the run (checkpoint/memory_pace.py)."""
    async_mode: str = "off"
    """`off`: training waits while a save is written. `thread`: a background thread writes it.
    `process`: a background process per worker writes it (no GIL contention with training).
    Either way the state is copied while the next step's forward and backward run, and
    training waits only if that copy is not done by the next optimizer step."""
    keep_last: int = 0
    """Keep the newest N committed checkpoints (0: this policy keeps none on its own)."""
    keep_best: int = 0
    """Keep the K checkpoints with the best `best_metric`."""
    best_metric: str = ""
    """Metric reported with each save (e.g. `loss`) that ranks checkpoints for `keep_best`
    and `restore: best`."""
    best_mode: str = "min"
    """`min` or `max`: whether a smaller or a larger `best_metric` is better."""
    keep_every: int = 0
    """Keep every checkpoint whose step is a multiple of M, for good."""
    overwrite: bool = False
    """Allow a save at a step that already has a committed checkpoint: the new one is written
    beside it and replaces it atomically. It also allows starting over from an earlier step
    (`restore: <step>`): then the committed checkpoints of later steps are deleted once the
    first new checkpoint commits."""
    restore: int | str = "latest"
    """Which checkpoint the job starts from: `latest`, `best`, or a step number. Restarts
    after a failure always resume from the latest checkpoint this job committed."""
    restore_parts: list[str] = field(default_factory=list)
    """Restore only these parts of the state, by key prefix (e.g. `train.model` for the model
    only); the rest keeps its initial values. Empty: everything."""
    strict: bool = True
    """With `false`, keys missing from the checkpoint or not in the model are reported in
    an event instead of failing the restore."""
    on_save_error: str = "continue"
    """When a save fails for its storage (disk full, no permission, S3 errors after retries):
    `continue` trains on and tries again at the next save; `stop` ends the attempt as a
    `storage_error`, and the driver resumes from the latest committed checkpoint after a
    back-off (budget: `failure.max_storage_errors`). Either way nothing is committed for that
    step, its partial files are removed and earlier checkpoints are not touched."""
    max_failed_saves: int = 3
    """With `on_save_error: continue`, this many failed saves in a row stop the job: training
    on without checkpoints would put every step since the last commit at risk."""

    def __post_init__(self) -> None:
        _require(self.interval_steps >= 0, "checkpoint.interval_steps", "it must be >= 0",
                 self.interval_steps)
        _seconds("checkpoint.interval_s", self.interval_s)
        interval = self.memory_interval_steps
        _require(interval == "auto" or (isinstance(interval, int) and not isinstance(interval, bool)
                                        and interval >= 0), "checkpoint.memory_interval_steps",
                 "give 'auto' or a number of steps >= 0 (0 turns the memory tier off)", interval)
        _require(self.async_mode in ASYNC_MODES, "checkpoint.async_mode",
                 f"use one of {', '.join(ASYNC_MODES)}", self.async_mode)
        for key in ("keep_last", "keep_best", "keep_every"):
            _require(getattr(self, key) >= 0, f"checkpoint.{key}", "it must be >= 0",
                     getattr(self, key))
        _require(self.best_mode in ("min", "max"), "checkpoint.best_mode", "use min or max",
                 self.best_mode)
        restore = self.restore
        _require(restore in ("latest", "best") or (isinstance(restore, int)
                                                    and not isinstance(restore, bool)
                                                    and restore >= 0),
                 "checkpoint.restore", "use latest, best or a step number", restore)
        if (self.keep_best or restore == "best") and not self.best_metric:
            what = "checkpoint.keep_best" if self.keep_best else "checkpoint.restore"
            raise ConfigError(f"{what} needs checkpoint.best_metric: name the metric that "
                              "ranks checkpoints (e.g. loss)")
        _require(self.on_save_error in SAVE_ERROR_ACTIONS, "checkpoint.on_save_error",
                 f"use one of {', '.join(SAVE_ERROR_ACTIONS)}", self.on_save_error)
        _require(self.max_failed_saves >= 1, "checkpoint.max_failed_saves", "it must be >= 1",
                 self.max_failed_saves)
        _require(isinstance(self.restore_parts, list)
                 and all(isinstance(p, str) and p for p in self.restore_parts),
                 "checkpoint.restore_parts", "give a list of key prefixes", self.restore_parts)

    @property
    def keeps_everything(self) -> bool:
        return not (self.keep_last or self.keep_best or self.keep_every)


@dataclass(kw_only=True, frozen=True)
class FailureConfig:
    max_restarts: int = 3
    """Restarts allowed after infrastructure failures (worker or node died, hang, preemption,
    failed start); one more stops the job."""
    max_user_errors: int = 3
    """Restarts allowed after exceptions raised by the workload; one more stops the job."""
    max_storage_errors: int = 3
    """Restarts allowed after the run's storage failed (a save under
    `checkpoint.on_save_error: stop`, or no committed checkpoint readable at a restore);
    one more stops the job."""
    crash_loop_limit: int = 3
    """The same user error (type, message, step) this many times in a row stops the job at
    once: a deterministic bug does not go away by restarting."""
    hang_timeout_s: float | str = "auto"
    """A rank with no progress (a finished step, save or restore) for this long is hung: it is
    killed and the job recovers. `auto`: `hang_factor` times the slowest step (or save) this
    run has seen, at least `hang_min_s`; `hang_first_step_s` for the start of an attempt and
    for a save not timed yet. A number: that many seconds for everything."""
    hang_factor: float = 5.0
    """With `hang_timeout_s: auto`: how many times its slowest so far a step or save may take."""
    hang_min_s: float = 10.0
    """With `hang_timeout_s: auto`: never less than this."""
    hang_first_step_s: float = 300.0
    """With `hang_timeout_s: auto`: the allowance from an attempt's launch to its first
    finished step (start-up, restore, compilation), and for the first save of a run."""
    backoff_initial_s: float = 1.0
    """Wait before the second restart in a row (the first after sustained progress is at once)."""
    backoff_multiplier: float = 2.0
    """Each further restart in a row waits this many times longer..."""
    backoff_max_s: float = 30.0
    """...up to this."""
    backoff_reset_after_s: float = 60.0
    """An attempt that trained this long before failing resets the back-off."""
    failure_grace_s: float = 1.0
    """After the first worker fails, how long to collect other ranks' outcomes before
    deciding: a SIGKILLed rank makes its peers fail within about a second, and the root
    cause should win over those echoes."""
    drain_timeout_s: float = 5.0
    """How long surviving workers get to leave a failed attempt before they are replaced
    rather than reused."""
    worker_start_timeout_s: float = 120.0
    """How long starting the workers and forming their process group may take."""
    collective_timeout_s: float = 300.0
    """torch.distributed timeout for one collective; bounds how long a dead peer can block."""

    def __post_init__(self) -> None:
        for key in ("max_restarts", "max_user_errors", "max_storage_errors"):
            _require(getattr(self, key) >= 0, f"failure.{key}", "it must be >= 0",
                     getattr(self, key))
        _require(self.crash_loop_limit >= 1, "failure.crash_loop_limit", "it must be >= 1",
                 self.crash_loop_limit)
        _require(self.backoff_multiplier >= 1, "failure.backoff_multiplier", "it must be >= 1",
                 self.backoff_multiplier)
        _require(math.isfinite(self.backoff_multiplier) and self.backoff_multiplier <= 1000,
                 "failure.backoff_multiplier", "it must be at most 1000",
                 self.backoff_multiplier)
        for key in ("backoff_initial_s", "backoff_max_s", "backoff_reset_after_s"):
            _seconds(f"failure.{key}", getattr(self, key))
        if isinstance(self.hang_timeout_s, str):
            _require(self.hang_timeout_s == "auto", "failure.hang_timeout_s",
                     "give 'auto' or a number of seconds", self.hang_timeout_s)
        else:
            _require(isinstance(self.hang_timeout_s, (int, float))
                     and not isinstance(self.hang_timeout_s, bool), "failure.hang_timeout_s",
                     "give 'auto' or a number of seconds", self.hang_timeout_s)
            _seconds("failure.hang_timeout_s", self.hang_timeout_s, zero_ok=False)
        _require(isinstance(self.hang_factor, (int, float)) and 1 <= self.hang_factor <= 1000,
                 "failure.hang_factor", "it must be between 1 and 1000", self.hang_factor)
        for key in ("hang_min_s", "hang_first_step_s", "failure_grace_s", "drain_timeout_s",
                    "worker_start_timeout_s", "collective_timeout_s"):
            _seconds(f"failure.{key}", getattr(self, key), zero_ok=False)


@dataclass(kw_only=True, frozen=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)

    def __post_init__(self) -> None:
        for fault in self.chaos.faults:
            _require(fault.rank < self.scaling.num_workers, "chaos.faults.rank",
                     f"ranks run from 0 to {self.scaling.num_workers - 1}", fault.rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML file (or start from defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = read_yaml_file(path) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(JobConfig, raw)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: write it as section.key=value")
    value = parse_yaml(text, key, depth=len(parts)) if text.strip() else ""
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, refusing unknown keys and wrong types."""
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # keys of mixed types sort too
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        hint = f"; {_REPLACED[key]}" if key in _REPLACED else ""
        raise ConfigError(f"unknown key '{key}'; allowed here: {', '.join(fields)}{hint}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e


_REPLACED = {
    "chaos.kill": "write chaos.faults: [{kind: kill, rank: R, at_step: S}]",
    "chaos.kill_during_save": "write chaos.faults: [{kind: kill_during_save, rank: R, "
                              "at_step: S}]",
}
"""Keys of earlier versions, and what to write instead."""

_WORDS_FOR_BOOL = {"true": True, "yes": True, "on": True,
                   "false": False, "no": False, "off": False}


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return {str(k): _convert(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is Any:
        return value
    if hint in (int, float) and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**63:  # beyond what a tensor, a wait or another tool holds
            raise ConfigError(f"{key}: {_short(value)} is out of range")
        return float(value) if hint is float else value
    if hint is bool and isinstance(value, str) and value.lower() in _WORDS_FOR_BOOL:
        # YAML 1.2 reads `yes`/`off` as strings; say what the user meant.
        return _WORDS_FOR_BOOL[value.lower()]
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {_short(value)}")
    return value
