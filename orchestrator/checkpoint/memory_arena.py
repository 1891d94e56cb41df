"""Where the memory tier's copies live, and how a buddy on the same node holds them for free.

The first copy tier (one snapshot and one gloo message exchange per copy) cost about 13 ms a
copy for the main job's GPT, whose step is 10 ms: 5 ms walking the state and building its
copy (3 of them in torch's get_state_dict), 8 ms packing, pickling and sending it to the
buddy. The bytes themselves take 0.13 ms to copy. This module removes the rest:

* A `Layout`, built at the first copy of an attempt, fixes where every tensor of the state
  goes: one slot each in an `Arena` (a flat byte buffer per generation). A later copy only
  flattens the state (a list compare says the structure is the same), copies the tensors
  into their slots in one `torch._foreach_copy_`, and keeps the plain values (step, LR, data
  position) as a list.
* On Linux the arena is a file in /dev/shm that the buddy maps too. Its pages then belong to
  both processes: when the owner dies they stay in the buddy's mapping, which is what the
  buddy copy was for, and no byte is sent. The file is unlinked as soon as the buddy has
  mapped it, so nothing outlives the two processes (not even a kill -9 of both; a kill in
  the milliseconds between creating and unlinking a file leaves it, and the next process
  to make an arena on the node removes it: `sweep_stale_files`). A header at the start
  says which step the arena holds, written after the bytes: the buddy trusts only a
  `PUBLISHED` arena. A buddy on another node cannot map it and gets its copies over gloo as
  before (memory.py's `exchange`).

Arenas are shared between processes of one job only, and the buddy checks a random token
from the owner before it trusts a mapping (the trust of Ray's own pickles, as memory.py).
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import pickle
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from orchestrator.checkpoint.snapshot import Sharded

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_MAGIC = 0x6F72636D656D3031  # "orcmem01"
_HEADER = 64
_ALIGN = 64
_EMPTY, _WRITING, _PUBLISHED = 0, 1, 2
# header int64 fields
_H_MAGIC, _H_TOKEN0, _H_TOKEN1, _H_STATE, _H_STEP, _H_VALUES, _H_SKELETON = range(7)


# --- the state, flattened -----------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where tensor `index` of a flattened state lives in an arena."""

    index: int
    offset: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Value:
    index: int


_PLAIN = (int, float, str, bool, bytes, tuple, type(None))


def flatten(state: Any) -> tuple[list[Any], list[torch.Tensor], list[Any]]:
    """(spec, tensors, values) of a nested state, Stateful objects as their state_dict() (the
    same for a state and its `plain_state`, without building the plain copy first): `spec`
    equal for two states means the same structure, keys, shapes and dtypes; tensors are
    local (a DTensor's shard); values are the other leaves, in order."""
    spec: list[Any] = []
    tensors: list[torch.Tensor] = []
    values: list[Any] = []

    # The training thread runs this at every copy (213 nodes for the main job's GPT): kept
    # to the fewest calls per node.
    add_spec, add_tensor, add_value = spec.append, tensors.append, values.append

    def walk(node: Any) -> None:
        kind = type(node)
        if kind is dict:
            add_spec(tuple(node))
            for v in node.values():
                walk(v)
        elif kind is torch.Tensor or kind is torch.nn.Parameter:
            add_spec((node.shape, node.dtype))
            add_tensor(node)  # only ever read, under no_grad: no detach (1 us each)
        elif kind is list:
            add_spec(len(node))
            for v in node:
                walk(v)
        elif isinstance(node, torch.Tensor):
            if isinstance(node, DTensor):
                local = node._local_tensor
                add_spec(("D", node.shape, tuple(node.stride()), tuple(node.placements),
                          local.shape, local.dtype))
            else:
                local = node
                add_spec((node.shape, node.dtype))
            add_tensor(local)
        elif kind in _PLAIN:  # before the Stateful check: a Protocol isinstance costs ~20 us
            add_spec(None)
            add_value(node)
        elif isinstance(node, Stateful):
            walk(node.state_dict())
        elif isinstance(node, dict):
            walk(dict(node))
        else:
            add_spec(None)
            add_value(node)

    walk(state)
    return spec, tensors, values


def frozen_values(values: list[Any]) -> list[Any]:
    """The values as they are now (a later change to a mutable leaf must not reach a copy)."""
    return [v if type(v) in (int, float, str, bool, type(None)) else copy.deepcopy(v)
            for v in values]


class Layout:
    """Where each tensor of one state's structure goes, and the structure to rebuild it."""

    def __init__(self, state: Any, deferred_storages: set[int]) -> None:
        self.spec, tensors, _ = flatten(state)
        offset, slots = 0, []
        for i, t in enumerate(tensors):
            slots.append(Slot(i, offset, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.slots = slots
        self.tensor_bytes = offset
        self.skeleton = self._skeleton(state, iter(slots))
        self.deferred = [i for i, t in enumerate(tensors)
                         if t.untyped_storage().data_ptr() in deferred_storages]
        """Tensors only `optimizer.step()` changes: copied on the memory thread, behind the
        step gate (snapshot.py); the others are copied at once."""
        self.deferred_ptrs = [tensors[i].data_ptr() for i in self.deferred]
        self.deferred_bytes = sum(tensors[i].numel() * tensors[i].element_size()
                                  for i in self.deferred)
        deferred = set(self.deferred)
        self.immediate = [i for i in range(len(tensors)) if i not in deferred]

    @staticmethod
    def _skeleton(node: Any, slots: Any) -> Any:
        counter = [0]

        def walk(n: Any) -> Any:
            if type(n) is dict:
                return {k: walk(v) for k, v in n.items()}
            if type(n) is list:
                return [walk(v) for v in n]
            if isinstance(n, torch.Tensor):
                slot = next(slots)
                if isinstance(n, DTensor):
                    return Sharded(slot, n.shape, tuple(n.stride()), tuple(n.placements))
                return slot
            counter[0] += 1
            return Value(counter[0] - 1)

        return walk(node)

    def fits(self, spec: list[Any], tensors: list[torch.Tensor]) -> bool:
        """Whether a state flattened now has this layout, its stable tensors where they were."""
        return spec == self.spec and [tensors[i].data_ptr() for i in self.deferred] == \
            self.deferred_ptrs


def views(layout_slots: list[Slot], data: torch.Tensor) -> list[torch.Tensor]:
    """The arena's tensors, in flattened order (views of `data`, its byte buffer)."""
    out = []
    for s in layout_slots:
        dtype = getattr(torch, s.dtype)
        n = 1
        for d in s.shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        out.append(data[s.offset:s.offset + nbytes].view(dtype).view(s.shape))
    return out


def rebuild(skeleton: Any, tensors: list[torch.Tensor], values: list[Any]) -> Any:
    """The nested state of a copy: tensors (a DTensor's as `Sharded`), values in their place."""

    def walk(n: Any) -> Any:
        if type(n) is dict:
            return {k: walk(v) for k, v in n.items()}
        if type(n) is list:
            return [walk(v) for v in n]
        if isinstance(n, Sharded):
            return Sharded(tensors[n.local.index], n.shape, n.stride, n.placements)
        if isinstance(n, Slot):
            return tensors[n.index]
        if isinstance(n, Value):
            return values[n.index]
        return n

    return walk(skeleton)


# --- arenas: private, or shared with the buddy through /dev/shm -------------------------------


class Arena:
    """One generation's buffer: [header][pickled values of the step held (capacity fixed)]
    [pickled skeleton][tensor slots]. `path` is set while the file still has a name."""

    def __init__(self, data: torch.Tensor, values_cap: int, tensors_at: int,
                 token: tuple[int, int], path: str | None) -> None:
        self.data = data
        self._bytes = data.numpy()  # the same memory: numpy's scalar writes cost 0.1 us, torch's 8
        self.header = self._bytes[:_HEADER].view(np.int64)
        self.token = token
        self.path = path
        self._values_cap = values_cap
        self._skeleton_at = _HEADER + values_cap
        self._tensors_at = tensors_at
        self.tensor_data = data[tensors_at:]

    @classmethod
    def create(cls, skeleton: bytes, values_bytes: int, tensor_bytes: int,
               shared: bool) -> "Arena":
        values_cap = max(64 * 1024, 4 * values_bytes)
        tensors_at = -(-(_HEADER + values_cap + len(skeleton)) // _ALIGN) * _ALIGN
        total = tensors_at + tensor_bytes
        token = (secrets.randbits(63), secrets.randbits(63))
        path = _create_shm_file(total) if shared else None
        if path is not None:
            data = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        else:
            data = torch.empty(total, dtype=torch.uint8)
        arena = cls(data, values_cap, tensors_at, token, path)
        h = arena.header
        h[_H_MAGIC], h[_H_TOKEN0], h[_H_TOKEN1] = _MAGIC, token[0], token[1]
        h[_H_STATE], h[_H_STEP], h[_H_VALUES], h[_H_SKELETON] = _EMPTY, -1, 0, len(skeleton)
        at = arena._skeleton_at
        data[at:at + len(skeleton)] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
        return arena

    def describe(self) -> dict[str, Any] | None:
        """What the buddy needs to map this arena (None: it has no file to map)."""
        if self.path is None:
            return None
        return {"path": self.path, "size": self.data.numel(), "token": self.token,
                "values_cap": self._values_cap, "tensors_at": self._tensors_at}

    @classmethod
    def open(cls, described: dict[str, Any] | None) -> "Arena | None":
        """The buddy's side: map another process's arena, if it is on this node and its
        header carries the token it was described with (else None: copies go over gloo)."""
        if not described:
            return None
        path, size, token = described["path"], described["size"], tuple(described["token"])
        try:
            if os.stat(path).st_size != size:
                return None
            data = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        except (OSError, RuntimeError):
            return None
        h = data[:_HEADER].view(torch.int64)
        if (int(h[_H_MAGIC]), int(h[_H_TOKEN0]), int(h[_H_TOKEN1])) != (_MAGIC, *token):
            return None
        return cls(data, described["values_cap"], described["tensors_at"], token, None)

    def unlink(self) -> None:
        path, self.path = self.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # --- the owner writes ----------------------------------------------------------------

    def begin(self) -> None:
        self.header[_H_STATE] = _WRITING

    def write_values(self, values: list[Any]) -> bool:
        blob = pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) > self._values_cap:
            return False
        self._bytes[_HEADER:_HEADER + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        self.header[_H_VALUES] = len(blob)
        return True

    def publish(self, step: int) -> None:
        """After every byte of the step is in place: only now may the buddy use it."""
        self.header[_H_STEP] = step
        self.header[_H_STATE] = _PUBLISHED

    # --- anyone reads ----------------------------------------------------------------------

    def published_step(self) -> int | None:
        if int(self.header[_H_STATE]) != _PUBLISHED:
            return None
        return int(self.header[_H_STEP])

    def read(self) -> tuple[Any, list[Any]]:
        """(skeleton, values) of the step held (a peer of this job wrote them: see the top)."""
        n_skel, n_values = int(self.header[_H_SKELETON]), int(self.header[_H_VALUES])
        at = self._skeleton_at
        skeleton = pickle.loads(self._bytes[at:at + n_skel].tobytes())
        values = pickle.loads(self._bytes[_HEADER:_HEADER + n_values].tobytes())
        return skeleton, values


def shm_room(nbytes: int) -> bool:
    """Whether /dev/shm can take `nbytes` more and still keep half its free space (Ray's
    object store lives there too; a container's default /dev/shm is only 64 MB)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return nbytes <= st.f_bavail * st.f_frsize // 2


PREFIX = "orchestrator-memory-"
STALE_AFTER_S = 60.0
"""An arena file is unlinked within milliseconds of its creation (once the buddy has mapped
it); one older than this whose creator is gone was left by a kill in that window."""
_swept = False


def sweep_stale_files(now: float | None = None) -> list[str]:
    """Remove the arena files of processes that died between creating and unlinking them
    (their pid is in the name): the only way one is left behind. Only files old enough that
    no set-up can still be using them, and only this user's. Returns what it removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            st = os.stat(path)
        except (ValueError, OSError):
            continue
        if st.st_uid != os.getuid() or now - st.st_mtime < STALE_AFTER_S or _alive(pid):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    if removed:
        log.warning("removed %d memory-tier file(s) in %s left by killed processes",
                    len(removed), SHM_DIR)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_shm_file(size: int) -> str | None:
    """A new file of `size` bytes in /dev/shm, its pages reserved now (a full tmpfs fails
    here, not with a SIGBUS at the first write), or None where that cannot be had."""
    global _swept
    if not os.path.isdir(SHM_DIR):
        return None
    if not _swept:  # once per process: what a kill in the set-up window left
        _swept = True
        sweep_stale_files()
    if not shm_room(size):
        return None
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=SHM_DIR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if e.errno in (errno.ENOSPC, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    os.close(fd)
    return path


def markers_in(skeleton: Any, marker: type) -> list[Any]:
    """The `marker` objects (each with an `index`) in a skeleton, DTensor shards' included,
    in index order."""
    found: list[Any] = []

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
        elif isinstance(n, Sharded):
            walk(n.local)
        elif isinstance(n, marker):
            found.append(n)

    walk(skeleton)
    return sorted(found, key=lambda m: m.index)


def read_copy(arena: Arena) -> Any:
    """The nested state a (buddy's) published arena holds, its tensors views of the arena."""
    skeleton, values = arena.read()
    return rebuild(skeleton, views(markers_in(skeleton, Slot), arena.tensor_data), values)


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """One C++ call for every tensor (a Python loop of 121 copies took twice as long)."""
    if dsts:
        with torch.no_grad():
            torch._foreach_copy_(dsts, srcs)
