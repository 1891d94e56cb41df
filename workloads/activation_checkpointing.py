"""Activation checkpointing: which activations a transformer keeps for backward, and which it
recomputes.

Modes (the GPT workload's `activation_checkpointing` argument):
  none                   keep everything (fastest, most memory);
  full                   every block recomputes its insides; only block inputs are kept;
  every_n:N              every N-th block is fully checkpointed, the others keep everything;
  selective[:OPS]        op-level (PyTorch's selective checkpointing): inside every block keep
                         the outputs of the chosen expensive ops and recompute the cheap ones
                         (layer norms, GELU, adds). OPS: a comma list of `attention` and
                         `matmul`; `selective` alone means `attention,matmul`.
All of them use non-reentrant checkpointing and leave the gradients unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                         checkpoint_wrapper)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten

# The ops whose outputs are worth keeping: expensive to recompute, per byte they occupy.
SAVEABLE_OPS = {
    "attention": [aten._scaled_dot_product_flash_attention_for_cpu.default,
                  aten._scaled_dot_product_flash_attention.default,
                  aten._scaled_dot_product_efficient_attention.default,
                  aten._scaled_dot_product_cudnn_attention.default],
    "matmul": [aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default],
}


@dataclass(frozen=True)
class ACMode:
    kind: str
    """'none', 'full', 'every_n' or 'selective'."""
    every_n: int = 1
    save_ops: tuple[str, ...] = ()

    @staticmethod
    def parse(value: object) -> "ACMode":
        """Accepts 'none', 'full', 'every_n:2' (or {every_n: 2}), 'selective',
        'selective:attention' and 'selective:attention,matmul'."""
        if isinstance(value, dict) and set(value) == {"every_n"}:
            value = f"every_n:{value['every_n']}"
        text = str(value).strip()
        kind, _, arg = text.partition(":")
        allowed = ("use none, full, every_n:N (N >= 1), selective, or selective:OPS with OPS "
                   f"from {', '.join(SAVEABLE_OPS)}")
        if kind in ("none", "full") and not arg:
            return ACMode(kind)
        if kind == "every_n" and arg.isdigit() and int(arg) >= 1:
            return ACMode(kind, every_n=int(arg))
        if kind == "selective":
            ops = tuple(o.strip() for o in (arg or "attention,matmul").split(","))
            if ops and all(o in SAVEABLE_OPS for o in ops):
                return ACMode(kind, save_ops=ops)
        raise ValueError(f"workload.args.activation_checkpointing: {value!r}; {allowed}")


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: ACMode) -> None:
    """Wrap the blocks in place. Call before DDP/FSDP wrapping (see gpt.parallelize)."""
    if mode.kind == "none":
        return
    for i, block in enumerate(blocks):
        if mode.kind == "every_n" and (i + 1) % mode.every_n:
            continue
        kwargs = {}
        if mode.kind == "selective":
            kwargs["context_fn"] = functools.partial(
                create_selective_checkpoint_contexts, _policy(mode.save_ops))
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                       **kwargs)


def _policy(save_ops: tuple[str, ...]):
    keep = {op for name in save_ops for op in SAVEABLE_OPS[name]}

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy
