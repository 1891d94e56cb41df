"""What every workload shares: argument parsing, wrapping for DDP/FSDP2, the step loop."""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from orchestrator.context import TrainContext, TrainState
from orchestrator.workload_args import parse_args  # noqa: F401 -- the workloads' one way to read args


def wrap_for_parallelism(model: torch.nn.Module, shard_units: list[torch.nn.Module],
                         parallelism: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with each of `shard_units` (e.g. transformer blocks) sharded on its own
    and then the root, so parameters are gathered one unit at a time."""
    if parallelism == "fsdp":
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for unit in shard_units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if parallelism == "ddp":
        # find_unused_parameters keeps DDP's gradient buckets in their initial order: DDP
        # otherwise re-orders them after the first iteration of each DDP instance, so the
        # first step after a restart would all-reduce in other buckets than the uninterrupted
        # run did at that step -- and with more than 2 ranks, a ring all-reduce sums each
        # element in an order that depends on where it sits in its bucket: the resumed run
        # would differ in the last bits.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    raise ValueError(f"workload.args.parallelism: {parallelism!r}; use 'ddp' or 'fsdp'")


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(steps // 10, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights, and RNG streams a resume restores."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def global_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all ranks (a sync point, once per step)."""
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train_loop(ctx: TrainContext, state: TrainState, steps: int,
               step_fn: Callable[[int], float], samples_per_step: int,
               extra_state: dict[str, Any] | None = None) -> None:
    """Restore, then run `step_fn(step) -> loss` for each remaining step, reporting every step
    and checkpointing when due and at the last step. `extra_state` (e.g. a data source) is
    saved and restored beside the training state."""
    checkpointed = {"train": state, **(extra_state or {})}
    start = ctx.restore(checkpointed)
    for step in range(start + 1, steps + 1):
        loss = step_fn(step)
        state.step = step
        state.data_position += samples_per_step
        ctx.report(step, loss=loss)
        if ctx.checkpoint_due(step) or step == steps:
            ctx.save_checkpoint(step, checkpointed, metrics={"loss": loss})
