"""When a workload saves: the step interval, the wall-time interval, and a stop request."""

from __future__ import annotations

import torch

from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.config import CheckpointConfig
from orchestrator.context import Reporter, StopMode, StopRequest, TrainContext


class FakeCheckpoints:
    """One rank alone: agreeing is the identity."""

    def __init__(self) -> None:
        self.saved: list[int] = []
        self.stall_s = 0.0

    def agree_max(self, values: list[int]) -> list[int]:
        return list(values)

    def save(self, step, state, metrics) -> None:
        self.saved.append(step)

    def wait(self) -> None:
        pass

    pending_failure = 0

    def raise_failure(self, agreed: int) -> None:
        assert agreed == 0


class NoFaults:
    def on_step_end(self, step: int) -> None:
        pass


def context(clock: list[float], monkeypatch, **checkpoint) -> tuple[TrainContext, FakeCheckpoints]:
    monkeypatch.setattr("orchestrator.context.time.monotonic", lambda: clock[0])
    fake = FakeCheckpoints()
    ctx = TrainContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), args={},
                       attempt=0, checkpoint=CheckpointConfig(**checkpoint),
                       restore=RestorePlan(), checkpoints=fake, faults=NoFaults(),
                       reporter=Reporter(), stop=StopRequest())
    return ctx, fake


def run(ctx: TrainContext, clock: list[float], steps: int, step_s: float) -> None:
    for step in range(1, steps + 1):
        clock[0] += step_s
        ctx.report(step, loss=1.0)
        if ctx.checkpoint_due(step):
            ctx.save_checkpoint(step, {})


def test_every_interval_steps(monkeypatch):
    clock = [0.0]
    ctx, fake = context(clock, monkeypatch, interval_steps=4)
    run(ctx, clock, 10, step_s=1.0)
    assert fake.saved == [4, 8]


def test_interval_s_saves_when_the_wall_time_has_passed_and_restarts_the_clock(monkeypatch):
    clock = [0.0]
    ctx, fake = context(clock, monkeypatch, interval_steps=0, interval_s=2.5)
    run(ctx, clock, 10, step_s=1.0)
    assert fake.saved == [3, 6, 9]  # 3 s since the last save each time (2.5 s not reached at 2)


def test_both_intervals_together(monkeypatch):
    clock = [0.0]
    ctx, fake = context(clock, monkeypatch, interval_steps=4, interval_s=5)
    run(ctx, clock, 12, step_s=1.0)
    assert fake.saved == [4, 8, 12]  # the step saves restart the wall clock too
    clock = [0.0]
    ctx, fake = context(clock, monkeypatch, interval_steps=10, interval_s=3)
    run(ctx, clock, 12, step_s=1.0)
    assert fake.saved == [3, 6, 9, 10]


def test_a_stop_request_saves_after_the_step_in_progress(monkeypatch):
    clock = [0.0]
    ctx, fake = context(clock, monkeypatch, interval_steps=100)
    ctx._stop.request(StopMode.NOW, "preempted")
    clock[0] += 1
    ctx.report(1, loss=1.0)
    assert ctx.checkpoint_due(1)
