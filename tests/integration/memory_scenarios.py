"""What each rank of a memory-tier test gang runs (module level: spawned processes import it).

The gang trains a small model under DDP or FSDP2 with a real MemoryTier on real gloo groups,
keeps the state of its last captured step, trains on past it, then plays a restart in which
the ranks in `lose` come back as new processes would (a new tier, other weights, no optimizer
state, another RNG state) and restores."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from orchestrator.checkpoint.memory import MemoryTier
from orchestrator.checkpoint.restore import with_rng
from orchestrator.checkpoint.snapshot import plain_state
from tests.helpers import flatten
from tests.integration.ckpt_scenarios import Trainer


def local_state(state: dict) -> dict[str, object]:
    """Every value of `state` as it would be saved, DTensors as their local shards (cloned)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in flatten(plain_state(state)).items():
        if isinstance(v, DTensor):
            v = v._local_tensor
        out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def lose_and_restore(rank, world, groups, parallelism, lose, captured_steps, newest_in_storage):
    ring = dist.new_group(backend="gloo")
    events: list[dict] = []
    emit = lambda kind, **fields: events.append({"kind": kind, **fields})  # noqa: E731
    tier = MemoryTier()
    trainer = Trainer(rank, world, parallelism)
    state = {"train": trainer.state}
    tier.begin_attempt(rank=rank, world_size=world, parallelism=parallelism, group=groups[0],
                       ring=ring, interval_steps=1, emit=emit)
    assert tier.restore(state, newest_in_storage=0) is None  # nothing held yet
    for step in range(1, captured_steps + 1):
        trainer.step(step)
        if step == captured_steps:
            reference = local_state(with_rng(rank, state))
        tier.capture(step)
    # The steps the failure loses: the first one's forward and backward overlap the copy of
    # the last captured step, and its optimizer step waits for that copy.
    torch.rand(3)  # the RNG moves on, as training would
    for step in range(captured_steps + 1, captured_steps + 3):
        trainer.step(step)
    tier.end_attempt(timeout_s=None)
    if rank in lose:  # as a new process: no copies, and state as from another seed
        tier = MemoryTier()
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(7.0)
        trainer.optimizer.state.clear()
        trainer.state.step = trainer.state.data_position = 0
        torch.manual_seed(99)
    tier.begin_attempt(rank=rank, world_size=world, parallelism=parallelism, group=groups[0],
                       ring=ring, interval_steps=1, emit=emit)
    restored = tier.restore(state, newest_in_storage=newest_in_storage)
    after = local_state(with_rng(rank, state))
    tier.end_attempt(timeout_s=None)
    equal = sorted(k for k in reference
                   if (torch.equal(reference[k], after[k]) if isinstance(reference[k], torch.Tensor)
                       else reference[k] == after[k]))
    return {"restored": restored, "events": events, "keys": sorted(reference),
            "equal": equal, "held": [(h.rank, h.step, h.kind) for h in tier.held()]}


def pace_and_learn(rank, world, groups, step_s, steps):
    """`auto`: the gang probes, agrees on one interval, copies at it; a replacement (rank 1
    as a new process) learns it at the next restore instead of probing again. Rank 1's steps
    take `step_s` (the gang waits for it in DDP's all-reduce), and those with a copy in
    flight twice that, as on a node with no CPU to spare: a copy costs a whole step."""
    from orchestrator.checkpoint.memory_pace import PROBE_STEPS

    ring = dist.new_group(backend="gloo")
    events: list[dict] = []
    emit = lambda kind, **fields: events.append({"kind": kind, **fields})  # noqa: E731
    tier = MemoryTier()
    trainer = Trainer(rank, world, "ddp")
    state = {"train": trainer.state}
    tier.begin_attempt(rank=rank, world_size=world, parallelism="ddp", group=groups[0],
                       ring=ring, interval_steps="auto", emit=emit)
    tier.restore(state, newest_in_storage=0)
    probing = range(PROBE_STEPS + 2, 2 * PROBE_STEPS + 2)  # steps with a probe copy in flight
    for step in range(1, steps + 1):
        trainer.step(step)
        if rank == 1:
            time.sleep(2 * step_s if step in probing else step_s)
        tier.capture(step)
    tier.end_attempt(timeout_s=None)
    held_steps = sorted({h.step for h in tier.held()})
    interval = tier.interval_steps
    if rank == 1:
        tier = MemoryTier()
    tier.begin_attempt(rank=rank, world_size=world, parallelism="ddp", group=groups[0],
                       ring=ring, interval_steps="auto", emit=emit)
    tier.restore(state, newest_in_storage=0)
    learned = tier.interval_steps
    tier.end_attempt(timeout_s=None)
    return {"interval": interval, "learned": learned, "held_steps": held_steps,
            "events": events}
