"""Which checkpoint an attempt restores: a pure function of the config and what is committed.

`checkpoint.restore` (latest, best or a step) and `restore_parts` apply until the job commits
a checkpoint of its own; from then on a restart resumes from the latest committed one, so a
failure never sends a run back to where it started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.checkpoint.commit import Candidate, Rejected
from orchestrator.checkpoint.retention import Saved, ranked_best
from orchestrator.config import CheckpointConfig
from orchestrator.errors import CheckpointError


@dataclass(frozen=True)
class RestorePlan:
    """What an attempt restores; handed to every worker."""

    candidates: list[int] = field(default_factory=list)
    """Steps to try, best first; the first that verifies is restored."""
    parts: list[str] = field(default_factory=list)
    """Key prefixes to restore ([]: everything)."""
    strict: bool = True
    required: bool = False
    """The user named this checkpoint: if none of the candidates verifies, fail rather than
    start from scratch."""


def plan_restore(cfg: CheckpointConfig, candidates: list[Candidate], rejected: list[Rejected],
                 where: str, *, committed_by_this_job: bool = False) -> RestorePlan:
    """`candidates` newest first, as commit.committed_checkpoints returns them."""
    future = [r for r in rejected if r.future_format]
    if future:
        raise CheckpointError(
            f"step {future[0].step} in {where} was written by a newer orchestrator "
            f"({future[0].reason}); upgrade before resuming this run. Nothing was changed.")
    newest_first = [c.step for c in candidates]
    if committed_by_this_job or cfg.restore == "latest":
        return RestorePlan(candidates=newest_first, parts=_parts(cfg, committed_by_this_job),
                           strict=cfg.strict or committed_by_this_job)
    if cfg.restore == "best":
        if not candidates:
            return RestorePlan(parts=list(cfg.restore_parts), strict=cfg.strict)
        best = [s.step for s in ranked_best([Saved(c.step, c.manifest.metrics) for c in candidates],
                                            cfg.best_metric, cfg.best_mode)]
        if not best:
            raise CheckpointError(
                f"checkpoint.restore: best, but no checkpoint in {where} reports "
                f"checkpoint.best_metric {cfg.best_metric!r}")
        _check_start_over(cfg, best[0], newest_first)
        return RestorePlan(candidates=best, parts=list(cfg.restore_parts), strict=cfg.strict,
                           required=True)
    step = int(cfg.restore)
    if step == 0:
        _check_start_over(cfg, 0, newest_first)
        return RestorePlan()
    if step not in newest_first:
        have = ", ".join(map(str, sorted(newest_first))) or "none"
        raise CheckpointError(f"checkpoint.restore: step {step} has no committed checkpoint in "
                              f"{where} (committed steps: {have})")
    _check_start_over(cfg, step, newest_first)
    return RestorePlan(candidates=[step], parts=list(cfg.restore_parts), strict=cfg.strict,
                       required=True)


def _parts(cfg: CheckpointConfig, committed_by_this_job: bool) -> list[str]:
    return [] if committed_by_this_job else list(cfg.restore_parts)


def _check_start_over(cfg: CheckpointConfig, step: int, newest_first: list[int]) -> None:
    later = [s for s in newest_first if s > step]
    if later and not cfg.overwrite:
        raise CheckpointError(
            f"checkpoint.restore: starting over from step {step} would save again over the "
            f"committed checkpoints of later steps ({', '.join(map(str, sorted(later)))}); "
            "set checkpoint.overwrite: true to start over (those checkpoints are deleted when "
            "the first new one commits)")
