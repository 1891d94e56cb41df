"""What each rank of a memory-tier test gang runs (module level: spawned processes import it).

The gang trains a small model under DDP or FSDP2 with a real MemoryTier on real gloo groups,
keeps the state of its last captured step, trains on past it, then plays a restart in which
the ranks in `lose` come back as new processes would (a new tier, other weights, no optimizer
state, another RNG state) and restores."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from orchestrator.checkpoint import memory
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


def lose_and_restore(rank, world, groups, parallelism, lose, captured_steps, newest_in_storage,
                     share_memory=True, relay_at=None, overlap=False):
    """`share_memory=False`: buddies exchange copies over gloo (as on two nodes). `relay_at`:
    at that step one of rank 1's optimizer state tensors is replaced, so its copies change
    layout."""
    if overlap:  # this model's copies are small enough to be taken inline: not these
        memory.INLINE_COPY_BYTES = 0
    ring = dist.new_group(backend="gloo")
    events: list[dict] = []
    emit = lambda kind, **fields: events.append({"kind": kind, **fields})  # noqa: E731
    tier = MemoryTier(share_memory=share_memory)
    trainer = Trainer(rank, world, parallelism)
    state = {"train": trainer.state}
    tier.begin_attempt(rank=rank, world_size=world, parallelism=parallelism, group=groups[0],
                       ring=ring, interval_steps=1, emit=emit)
    assert tier.restore(state, newest_in_storage=0) is None  # nothing held yet
    for step in range(1, captured_steps + 1):
        trainer.step(step)
        if step == relay_at and rank == 1:  # as a load_state_dict would: new storage
            first = next(iter(trainer.optimizer.state.values()))
            first["exp_avg"] = first["exp_avg"].clone()
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
        tier = MemoryTier(share_memory=share_memory)
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
    equal = sorted(k for k in reference if k in after
                   and (torch.equal(reference[k], after[k]) if isinstance(reference[k], torch.Tensor)
                        else reference[k] == after[k]))
    return {"restored": restored, "events": events, "keys": sorted(reference),
            "equal": equal, "held": [(h.rank, h.step, h.kind) for h in tier.held()],
            "pid": os.getpid()}


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


def kept_state_dicts_match_torch(rank, world, groups, parallelism, activation_checkpointing):
    """TrainState.state_dict (kept between calls, checkpoint/state_dict_cache.py) against
    torch's get_state_dict at every step of a GPT with its LR scheduler, before and after a
    load_state_dict replaces the optimizer's state. Returns what differed, per step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    from workloads.common import parse_args
    from workloads.data import token_batch
    from workloads.gpt import GPTArgs, build

    a = parse_args(GPTArgs, {"steps": 8, "parallelism": parallelism,
                             "activation_checkpointing": activation_checkpointing})
    model, state = build(a, torch.device("cpu"))

    def differences() -> list[str]:
        ours, theirs = state.state_dict(), get_state_dict(state.model, state.optimizer)
        mine = flatten({"model": ours["model"], "optimizer": ours["optimizer"]})
        torch_ = flatten({"model": theirs[0], "optimizer": theirs[1]})
        if mine.keys() != torch_.keys():
            return [f"keys: {sorted(set(mine) ^ set(torch_))}"]
        out = []
        for k, v in torch_.items():
            m = mine[k]
            if isinstance(v, torch.Tensor):
                lv, lm = (getattr(v, "_local_tensor", v), getattr(m, "_local_tensor", m))
                if (isinstance(v, DTensor) != isinstance(m, DTensor) or not torch.equal(lv, lm)
                        or lv.untyped_storage().data_ptr() != lm.untyped_storage().data_ptr()):
                    out.append(k)
            elif m != v:
                out.append(f"{k}: {m!r} != {v!r}")
        return out

    found = {"before_any_step": differences()}
    for step in range(1, 7):
        x, y = token_batch(a.seed, state.data_position, a.batch_size, rank, world, a.seq_len,
                           a.vocab_size)
        model(x, y).backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step, state.data_position = step, state.data_position + a.batch_size
        found[f"step {step}"] = differences()
        if step == 3:  # as a restore does: the optimizer's state tensors are replaced
            import copy
            state.load_state_dict(copy.deepcopy(state.state_dict()))
            found["after load_state_dict"] = differences()
    return found
