"""Which committed checkpoints to delete: a pure function of their steps, metrics and policy.

A checkpoint is kept if any policy keeps it (`keep_last`, `keep_best`, `keep_every`); with no
policy set, all are kept. The newest one is always kept, whatever the policies say.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config import CheckpointConfig


@dataclass(frozen=True)
class Saved:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def ranked_best(saved: list[Saved], metric: str, mode: str) -> list[Saved]:
    """Checkpoints that report `metric`, best first (ties: the newer first)."""
    with_metric = [s for s in saved if metric in s.metrics]
    sign = 1 if mode == "min" else -1
    return sorted(with_metric, key=lambda s: (sign * s.metrics[metric], -s.step))


def to_delete(saved: list[Saved], cfg: CheckpointConfig) -> list[int]:
    """Steps to delete, ascending. Steps compare as numbers, never as strings."""
    if cfg.keeps_everything or not saved:
        return []
    by_step = sorted(saved, key=lambda s: s.step)
    keep = {by_step[-1].step}
    if cfg.keep_last:
        keep |= {s.step for s in by_step[-cfg.keep_last:]}
    if cfg.keep_best:
        keep |= {s.step for s in ranked_best(by_step, cfg.best_metric, cfg.best_mode)[:cfg.keep_best]}
    if cfg.keep_every:
        keep |= {s.step for s in by_step if s.step % cfg.keep_every == 0}
    return [s.step for s in by_step if s.step not in keep]
