"""A CheckFreq-style snapshot of the training state, for async saves.

Copying the whole state before training may go on is what makes a plain DCP `async_save`
stall (a full copy, 0.45x of a sync save here). But parameters and optimizer state only change
in `optimizer.step()`: between one optimizer step and the next, forward and backward only
read them. So `take()` copies everything else at once (small: RNG states, step counters,
buffers), and leaves parameters and optimizer state to `copy_deferred()`, which the save
thread runs while the next step's forward and backward run. A pre-hook on the optimizer
(`wait_before_step`) makes the next `optimizer.step()` wait for that copy, should it not be
done yet.

The assumption is the contract: parameters and optimizer state are changed only by
`optimizer.step()` (or nothing at all) between two steps. A workload that changes them
elsewhere (an EMA of the weights written in place in forward, say) uses `async_mode: off`.

Copies go into buffers kept from one save to the next (allocated once; in shared memory when
another process writes them), so a save allocates nothing in the steady state.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor


_LEAVES = (torch.Tensor, int, float, str, bytes, type(None), list, tuple)


def plain_state(state: Any) -> Any:
    """The nested dict DCP would save: Stateful objects replaced by their state_dict()."""
    if type(state) is dict:  # the common case first: a Protocol isinstance costs ~20 us
        return {k: plain_state(v) for k, v in state.items()}
    if isinstance(state, _LEAVES):
        return state
    if isinstance(state, Stateful):
        state = state.state_dict()
    if isinstance(state, dict):
        return {k: plain_state(v) for k, v in state.items()}
    return state


def stable_storages(state: dict[str, Any]) -> set[int]:
    """Data pointers of the tensors that only `optimizer.step()` changes: the parameters and
    the optimizer state of every optimizer found in `state` (objects with `.optimizer`)."""
    ptrs: set[int] = set()
    for opt in optimizers_in(state):
        for group in opt.param_groups:
            for p in group["params"]:
                ptrs.add(_local(p).untyped_storage().data_ptr())
        for per_param in opt.state.values():
            for v in per_param.values():
                if isinstance(v, torch.Tensor):
                    ptrs.add(_local(v).untyped_storage().data_ptr())
    return ptrs


def optimizers_in(state: dict[str, Any]) -> list[torch.optim.Optimizer]:
    found = []
    for value in state.values():
        opt = getattr(value, "optimizer", None)
        if isinstance(opt, torch.optim.Optimizer):
            found.append(opt)
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class Sharded:
    """A DTensor's local shard and what it takes to rebuild the DTensor in another process
    (whose mesh is its own process group's)."""

    local: torch.Tensor
    shape: torch.Size
    stride: tuple[int, ...]
    placements: tuple[Any, ...]


@dataclass
class Snapshot:
    """The copy of one save's state. `state` is final once `copied` is set."""

    state: dict[str, Any]
    deferred: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(buffer, live tensor) pairs still to copy."""
    copied: threading.Event = field(default_factory=threading.Event)
    copy_s: float = 0.0

    def copy_deferred(self) -> None:
        t0 = time.monotonic()
        try:
            with torch.no_grad():
                for buffer, live in self.deferred:
                    buffer.copy_(live)
        finally:
            self.deferred = []
            self.copy_s = time.monotonic() - t0
            self.copied.set()


class Snapshotter:
    def __init__(self, *, shared_memory: bool, keep_dtensors: bool) -> None:
        """`shared_memory`: buffers another process can read (process mode).
        `keep_dtensors`: rebuild DTensors around the copies (a writer in this process);
        otherwise they become `Sharded` leaves, for a writer process to rebuild."""
        self._shared = shared_memory
        self._keep_dtensors = keep_dtensors
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, state: dict[str, Any]) -> Snapshot:
        """Copy what may change before the next optimizer step now; defer the rest.
        Call on the training thread, with the previous snapshot fully written."""
        stable = stable_storages(state)
        snap = Snapshot(state={})
        snap.state = self._walk(plain_state(state), "", stable, snap)
        if not snap.deferred:
            snap.copied.set()
        return snap

    def _walk(self, node: Any, path: str, stable: set[int], snap: Snapshot) -> Any:
        if isinstance(node, dict):
            return {k: self._walk(v, f"{path}.{k}", stable, snap) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, f"{path}.{i}", stable, snap) for i, v in enumerate(node)]
        if not isinstance(node, torch.Tensor):
            return copy.deepcopy(node)
        local = _local(node).detach()
        buffer = self._buffer(path, local)
        if local.untyped_storage().data_ptr() in stable:
            snap.deferred.append((buffer, local))
        else:
            with torch.no_grad():
                buffer.copy_(local)
        if not isinstance(node, DTensor):
            return buffer
        if self._keep_dtensors:
            return DTensor.from_local(buffer, node.device_mesh, node.placements, run_check=False,
                                      shape=node.shape, stride=node.stride())
        return Sharded(buffer, node.shape, tuple(node.stride()), tuple(node.placements))

    def _buffer(self, path: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu")
            if self._shared:
                buf.share_memory_()
            self._buffers[path] = buf
        return buf


class StepGate:
    """Makes `optimizer.step()` wait until the snapshot in progress has been copied."""

    def __init__(self, on_wait: Callable[[float], None]) -> None:
        self._pending: Snapshot | None = None
        self._on_wait = on_wait
        self._hooked: set[int] = set()
        self._handles: list[Any] = []

    def hook(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            if id(opt) not in self._hooked:
                self._hooked.add(id(opt))
                self._handles.append(opt.register_step_pre_hook(lambda *_: self.wait()))

    def arm(self, snap: Snapshot) -> None:
        self._pending = snap

    def wait(self) -> None:
        snap, self._pending = self._pending, None
        if snap is None or snap.copied.is_set():
            return
        t0 = time.monotonic()
        snap.copied.wait()
        self._on_wait(time.monotonic() - t0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], set()
