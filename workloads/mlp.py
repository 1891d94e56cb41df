"""A tiny MLP regression, for fast tests of the orchestrator itself.

Faults (a bug that raises, a deadlock) come from the chaos vocabulary (`FaultPlan.raise_at`,
`block_at`), not from arguments of the workload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from orchestrator.context import TrainContext, TrainState
from orchestrator.data.order import rank_slice
from workloads.common import global_mean, parse_args, seed_everything, train_loop, warmup_cosine, wrap_for_parallelism


@dataclass(kw_only=True)
class MLPArgs:
    steps: int = 20
    seed: int = 0
    width: int = 32
    batch_size: int = 16
    """Global batch over all ranks; split evenly among them."""
    lr: float = 1e-2
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    step_time_s: float = 0.0
    """Extra sleep per step, to make a tiny model behave like a slower one in tests."""


ARGS = MLPArgs
"""The arguments `orchestrator run` checks before Ray starts (orchestrator/workload_args.py)."""


def batch(seed: int, position: int, global_batch: int, rank: int, world_size: int):
    """Sample i of the stream depends on (seed, i) alone, whatever the world size."""
    x = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(seed * 7919 + i))
                     for i in rank_slice(position, global_batch, rank, world_size)])
    return x, x.sum(dim=1, keepdim=True).sin()


def train(ctx: TrainContext) -> None:
    a = parse_args(MLPArgs, ctx.args)
    seed_everything(a.seed)
    layers = [nn.Linear(8, a.width), nn.Tanh(), nn.Linear(a.width, a.width), nn.Tanh(),
              nn.Linear(a.width, 1)]
    model = wrap_for_parallelism(nn.Sequential(*layers).to(ctx.device), [], a.parallelism,
                                 ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    state = TrainState(model, optimizer, warmup_cosine(optimizer, a.steps))

    def step_fn(step: int) -> float:
        x, y = batch(a.seed, state.data_position, a.batch_size, ctx.rank, ctx.world_size)
        loss = nn.functional.mse_loss(model(x.to(ctx.device)), y.to(ctx.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        if a.step_time_s:
            time.sleep(a.step_time_s)
        return global_mean(loss)

    train_loop(ctx, state, a.steps, step_fn, samples_per_step=a.batch_size)
