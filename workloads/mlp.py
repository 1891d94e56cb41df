"""A tiny MLP regression, for fast tests of the orchestrator itself.

Stand-ins for bugs in user code, at one step, on the ranks in `fault_ranks` and the attempts in
`fault_attempts` (all when empty): `raise_at_step` raises a RuntimeError; `hang_at_step` blocks
forever, as a deadlock or a lost collective peer would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
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
    raise_at_step: int = 0
    hang_at_step: int = 0
    fault_ranks: list[int] = field(default_factory=list)
    fault_attempts: list[int] = field(default_factory=list)


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
        faulty = ((not a.fault_ranks or ctx.rank in a.fault_ranks)
                  and (not a.fault_attempts or ctx.attempt in a.fault_attempts))
        if faulty and step == a.raise_at_step:
            raise RuntimeError(f"injected bug at step {step}")
        if faulty and step == a.hang_at_step:
            threading.Event().wait()  # blocks forever; its peers block in the next collective
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
