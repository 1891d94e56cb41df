"""torch's `get_state_dict(model, optimizer)`, without paying for it at every step.

`get_state_dict` costs about 3 ms for the main job's GPT (2 cores here), most of it
re-deriving parameter names; that is a third of a 10 ms step, which the memory tier paid
after every step it copied. Yet between two calls of one attempt almost nothing it returns
changes identity: the model's tensors are the parameters and buffers themselves (updated in
place), the optimizer state's tensors are the optimizer's own. What does change is the
optimizer's `param_groups` (the LR the scheduler set) and any state the optimizer adds.

So the first call is torch's, and its result is kept together with what it rests on: the
identity and storage of every parameter, buffer and optimizer-state tensor. A later call
returns the kept tensors with fresh `param_groups` if all of that still holds, and calls
torch again if anything moved (a `load_state_dict`, a parameter replaced, a new state entry):
never a stale tensor, at the price of one pass over the modules and tensors (~0.14 ms).
The kept result holds the storages it was made of, so no new tensor can take an old one's
address while it is kept: a replaced tensor always shows as a changed identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict


def _identity(t: torch.Tensor) -> tuple[int, int]:
    """The object and the address of its first element (storage and offset in one call)."""
    return id(t), getattr(t, "_local_tensor", t).data_ptr()  # a DTensor: its shard's


def _footing(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> list[Any]:
    """What a kept result rests on, cheap to recompute: every module's children and every
    tensor's identity and storage, in a fixed order, with the optimizer state's keys.
    `modules` is the model's modules as last listed: a child replaced or added anywhere
    shows in its parent's children, so the list need not be walked again each call (the
    walk, `named_modules`, was half the cost)."""
    footing: list[Any] = []
    for m in modules:
        footing.append(tuple(map(id, m._modules.values())))
        footing += [None if t is None else _identity(t) for t in m._parameters.values()]
        footing += [None if t is None else _identity(t) for t in m._buffers.values()]
    for group in optimizer.param_groups:
        for p in group["params"]:
            per_param = optimizer.state.get(p)
            if per_param is None:
                footing.append(None)
                continue
            for k, v in per_param.items():
                footing.append((k, _identity(v)) if isinstance(v, torch.Tensor) else (k, v))
    return footing


class StateDictCache:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model, self._optimizer = model, optimizer
        self._modules: list[torch.nn.Module] = []
        self._footing: list[Any] | None = None
        self._model_sd: dict[str, Any] = {}
        self._optim_state: dict[str, Any] = {}
        self._group_params: list[list[Any]] = []

    def get(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state dict, optimizer state dict), as `get_state_dict` returns them now."""
        footing = _footing(self._modules, self._optimizer)
        if footing != self._footing:
            self._modules = list(self._model.modules())
            footing = _footing(self._modules, self._optimizer)
            model_sd, optim_sd = get_state_dict(self._model, self._optimizer)
            if not self._keepable(optim_sd):
                self._footing = None
                return model_sd, optim_sd
            self._footing, self._model_sd = footing, model_sd
            self._optim_state = optim_sd["state"]
            self._group_params = [g["params"] for g in optim_sd["param_groups"]]
            return model_sd, optim_sd
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": names}
                  for group, names in zip(self._optimizer.param_groups, self._group_params)]
        # New dicts each call, over the kept tensors: a caller may change the dicts freely.
        return dict(self._model_sd), {"state": {k: dict(v) for k, v in self._optim_state.items()},
                                      "param_groups": groups}

    def invalidate(self) -> None:
        self._footing, self._modules = None, []

    def _keepable(self, optim_sd: dict[str, Any]) -> bool:
        """Only the shape of result this class knows how to refresh is kept."""
        return (set(optim_sd) == {"state", "param_groups"}
                and len(optim_sd["param_groups"]) == len(self._optimizer.param_groups))
