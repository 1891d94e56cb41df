"""Measuring activation memory: right on CPU and on GPU.

On GPU the caching allocator knows its peak. On CPU there is no such counter, and the obvious
tools mislead: `saved_tensors_hooks` never sees what selective checkpointing caches, and RSS
keeps freed memory unless glibc is told to give it back (MALLOC_MMAP_THRESHOLD_). So
`ActivationMemory` watches every op of the forward pass through a TorchDispatchMode and
keeps a weak reference to each storage an op creates: the storages still alive when forward
returns are exactly what is kept for backward (plus the forward's output).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ActivationMemory(TorchDispatchMode):
    """Use around a forward pass:

        with ActivationMemory() as mem:
            loss = model(x, y)
        mem.live_bytes   # bytes created in forward and still alive: the activations kept
    """

    def __init__(self) -> None:
        super().__init__()
        self._created: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.created_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place ops return storages their inputs already had (a weight's
        # transpose is the weight): only storages new to this op are activations.
        existing = {s.data_ptr() for s in _storages((args, kwargs))}
        for storage in _storages(out):
            key = storage.data_ptr()
            if key in existing:
                continue
            if key not in self._created or self._created[key][0].expired():
                self._created[key] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.created_bytes = sum(n for _, n in self._created.values())
        self.live_bytes = sum(n for ref, n in self._created.values() if not ref.expired())


def _storages(tree) -> list[torch.UntypedStorage]:
    out = []
    for t in tree_flatten(tree)[0]:
        t = getattr(t, "_local_tensor", t)  # a DTensor's storage is its local shard's
        if isinstance(t, torch.Tensor) and not _is_wrapper(t):
            out.append(t.untyped_storage())
    return out


def _is_wrapper(t: torch.Tensor) -> bool:
    """DTensors and other subclasses have no storage of their own; their local parts do."""
    return type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)
