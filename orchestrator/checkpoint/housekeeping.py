"""Storage chores around the commit protocol: may a step be saved, what a commit replaced,
retention, marking corrupt checkpoints, and garbage (debris of interrupted saves).

All of it runs on one process at a time: rank 0 of the gang (off the training thread), the
driver at job start, or `orchestrator ckpt gc`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.checkpoint import commit, retention
from orchestrator.checkpoint.layout import (MANIFEST, PROBES, SAVE_DIR_PREFIX, RunLayout,
                                            parse_step_dir)
from orchestrator.checkpoint.manifest import FutureFormatError, ManifestError
from orchestrator.config import CheckpointConfig


def refuse_save(layout: RunLayout, step: int, overwrite: bool) -> str | None:
    """Why `step` must not be saved now, or None. A step whose checkpoint was marked invalid
    may always be saved again: that is how a run gets past a corrupt checkpoint."""
    storage = layout.storage
    if not storage.exists(*layout.manifest(step)):
        return None
    if storage.exists(*layout.invalid_marker(step)):
        return None
    where = storage.url_of(*layout.step_dir(step))
    try:
        commit.read_manifest(layout, step)
    except FutureFormatError as e:
        return f"step {step} in {where} was written by a newer orchestrator ({e}); not replacing it"
    except ManifestError:
        pass  # unreadable: a replacement is what it needs, if overwrite allows
    if not overwrite:
        return (f"step {step} already has a committed checkpoint in {where}; refusing to "
                "overwrite it (set checkpoint.overwrite: true to replace it; that also deletes "
                "the committed checkpoints of later steps)")
    return None


def later_steps(layout: RunLayout, step: int) -> list[int]:
    """Committed steps after `step`: what a start-over with overwrite replaces. Called on the
    training thread before every save with overwrite, so it reads no manifest: one listing,
    and an existence check for the (normally no) later steps."""
    return [s for s in layout.step_dirs() if s > step
            and layout.storage.exists(*layout.manifest(s))]


def after_commit(layout: RunLayout, step: int, cfg: CheckpointConfig,
                 replaced_later: list[int] = ()) -> list[dict[str, Any]]:
    """Run after step `step` committed: remove what that commit replaced (the previous save
    of the same step, an invalid marker), the committed checkpoints of later steps when the
    run started over (`replaced_later`, listed before the save began, so never a save in
    flight), and what retention no longer keeps. Returns the events to log."""
    events: list[dict[str, Any]] = []
    removed = _replaced_files(layout, step)
    if removed:
        events.append({"kind": "checkpoint_replaced", "step": step, "removed": removed})
    if replaced_later:
        for later in replaced_later:
            commit.delete_checkpoint(layout, later)
        events.append({"kind": "checkpoint_deleted", "steps": list(replaced_later),
                       "reason": f"the run started over at step {step} (overwrite)"})
    if cfg.keeps_everything:
        return events  # no policy: nothing to list, nothing to delete
    candidates, _ = commit.committed_checkpoints(layout)
    # Only steps up to this one: a later step may be a save still in flight.
    saved = [retention.Saved(c.step, c.manifest.metrics) for c in candidates if c.step <= step]
    doomed = retention.to_delete(saved, cfg)
    for old in doomed:
        commit.delete_checkpoint(layout, old)
    if doomed:
        events.append({"kind": "checkpoint_deleted", "steps": doomed, "reason": "retention"})
    return events


def _replaced_files(layout: RunLayout, step: int) -> list[str]:
    storage = layout.storage
    manifest = commit.read_manifest(layout, step)
    removed = []
    for entry in storage.list_dir(*layout.step_dir(step)):
        name = entry.name
        stale_save = name.startswith(SAVE_DIR_PREFIX) and name != manifest.data_dir
        # Files of a format-1 save sit in the step folder itself.
        stale_v1 = manifest.data_dir and not name.startswith(SAVE_DIR_PREFIX) and name != MANIFEST
        if stale_save or stale_v1:
            storage.remove_tree(*layout.step_dir(step), name)
            removed.append(name)
    return removed


def mark_invalid(layout: RunLayout, step: int, problems: list[str]) -> None:
    """Record that `step` failed verification. Its files stay for inspection; it is never
    restored again, a new save of the step replaces it, and gc removes it."""
    body = {"step": step, "problems": problems, "marked_at": time.time()}
    layout.storage.write_atomic(json.dumps(body, indent=1).encode(), *layout.invalid_marker(step))


def remove_failed_save(layout: RunLayout, step: int, data_dir: str) -> str:
    """Remove what a failed save of `step` wrote into its folder `data_dir`; say what was
    done. Never touches a committed checkpoint: if a manifest names `data_dir`, the commit
    went through after all (an answer lost after the write) and it stays. What cannot be
    removed now (the storage is failing) is left for the next job start or `ckpt gc`."""
    storage = layout.storage
    try:
        if storage.exists(*layout.manifest(step)):
            if commit.read_manifest(layout, step).data_dir == data_dir:
                return "kept: its manifest was written after all"
            storage.remove_tree(*layout.data_dir(step, data_dir))
        else:
            storage.remove_tree(*layout.step_dir(step))
        return "removed"
    except (ManifestError, OSError) as e:
        return f"left for the next start or ckpt gc ({type(e).__name__})"


@dataclass(frozen=True)
class Debris:
    parts: tuple[str, ...]
    reason: str
    age_s: float | None


def find_debris(layout: RunLayout, *, min_age_s: float = 0.0, now: float | None = None,
                include_invalid: bool = True) -> list[Debris]:
    """What gc may remove: step folders without a manifest (interrupted saves), save folders
    their manifest does not name (an interrupted overwrite), start-up probes left behind
    (storage_probe.py), and (`include_invalid`)
    checkpoints marked invalid, which only `orchestrator ckpt gc` removes: the driver keeps
    them for inspection.

    A folder changed less than `min_age_s` ago is left alone: it may be a save in flight of a
    job still running. Steps this orchestrator cannot read (a newer format, or a read that
    failed) are never touched.
    """
    storage = layout.storage
    now = time.time() if now is None else now
    found = []
    for step in layout.step_dirs():
        step_dir = layout.step_dir(step)
        try:
            if not storage.exists(*layout.manifest(step)):
                found.append((step_dir, "no manifest: an interrupted save"))
                continue
            manifest = commit.read_manifest(layout, step)
            if storage.exists(*layout.invalid_marker(step)):
                if include_invalid:
                    found.append((step_dir,
                                  f"marked invalid: {commit.invalid_reason(layout, step)}"))
                continue
            entries = storage.list_dir(*step_dir)
        except (ManifestError, OSError):
            continue  # what cannot be read is never deleted
        for entry in entries:
            if entry.name.startswith(SAVE_DIR_PREFIX) and entry.name != manifest.data_dir:
                found.append(((*step_dir, entry.name), "a save folder the manifest does not name"))
            elif entry.name.startswith(".tmp-"):
                found.append(((*step_dir, entry.name), "a temporary file"))
    try:
        probes = storage.list_dir(layout.run_name, PROBES)
    except OSError:
        probes = []
    found += [((layout.run_name, PROBES, p.name), "a start-up probe of workers that died in it")
              for p in probes]
    debris = []
    for parts, reason in found:
        _, mtime = storage.tree_stats(*parts)
        age = None if mtime is None else now - mtime
        if age is None or age >= min_age_s:
            debris.append(Debris(parts, reason, age))
    return debris


def remove_debris(layout: RunLayout, debris: list[Debris]) -> None:
    for d in debris:
        step = parse_step_dir(d.parts[-1])
        if step is not None:
            # A whole step folder: the manifest (if any) first, as for any deletion.
            commit.delete_checkpoint(layout, step)
        else:
            layout.storage.remove_tree(*d.parts)
