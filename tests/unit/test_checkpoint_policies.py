"""Pure checkpoint policies: retention, restore selection, manifest migration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.checkpoint.commit import Candidate, Rejected
from orchestrator.checkpoint.manifest import (
    FORMAT_VERSION, FileEntry, Manifest, ManifestError, checksum_stream, migrate,
)
from orchestrator.checkpoint.retention import Saved, to_delete
from orchestrator.checkpoint.selection import plan_restore
from orchestrator.config import CheckpointConfig
from orchestrator.errors import CheckpointError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "format_v1" / "v1run" / "checkpoints"


def cfg(**kw) -> CheckpointConfig:
    return CheckpointConfig(**kw)


# --- retention -------------------------------------------------------------------------------


def test_no_policy_keeps_everything():
    assert to_delete([Saved(s) for s in (1, 2, 3)], cfg()) == []


def test_a_checkpoint_is_kept_if_any_policy_keeps_it():
    saved = [Saved(s, {"loss": 0.1 if s == 3 else float(s)}) for s in range(1, 10)]
    c = cfg(keep_last=2, keep_every=4, keep_best=1, best_metric="loss")
    assert to_delete(saved, c) == [1, 2, 5, 6, 7]


def test_steps_sort_by_number_not_by_string_and_the_latest_is_always_kept():
    saved = [Saved(s) for s in (9, 100, 10, 99)]  # as strings, "99" > "100"
    assert to_delete(saved, cfg(keep_last=1)) == [9, 10, 99]
    # keep_best alone, with the newest being the worst: the newest survives anyway.
    saved = [Saved(1, {"acc": 0.9}), Saved(2, {"acc": 0.5})]
    assert to_delete(saved, cfg(keep_best=1, best_metric="acc", best_mode="max")) == []
    saved.append(Saved(3, {"acc": 0.1}))
    assert to_delete(saved, cfg(keep_best=1, best_metric="acc", best_mode="max")) == [2]


# --- restore selection ------------------------------------------------------------------------


def cand(step: int, **metrics: float) -> Candidate:
    return Candidate(step, Manifest(step=step, world_size=2, parallelism="ddp", files={},
                                    metrics=metrics))


CANDS = [cand(30, loss=0.3), cand(20, loss=0.1), cand(10, loss=0.5)]  # newest first


def test_latest_tries_every_committed_checkpoint_newest_first():
    plan = plan_restore(cfg(), CANDS, [], "u")
    assert plan.candidates == [30, 20, 10] and not plan.required


def test_best_ranks_by_the_metric_and_needs_overwrite_to_start_over():
    with pytest.raises(CheckpointError, match="overwrite"):
        plan_restore(cfg(restore="best", best_metric="loss"), CANDS, [], "u")
    plan = plan_restore(cfg(restore="best", best_metric="loss", overwrite=True), CANDS, [], "u")
    assert plan.candidates == [20, 30, 10] and plan.required
    with pytest.raises(CheckpointError, match="reports checkpoint.best_metric 'acc'"):
        plan_restore(cfg(restore="best", best_metric="acc"), CANDS, [], "u")


def test_a_named_step_must_exist_and_the_message_lists_what_does():
    plan = plan_restore(cfg(restore=30), CANDS, [], "u")
    assert plan.candidates == [30] and plan.required
    with pytest.raises(CheckpointError, match=r"step 25 has no committed checkpoint in u "
                                              r"\(committed steps: 10, 20, 30\)"):
        plan_restore(cfg(restore=25), CANDS, [], "u")
    with pytest.raises(CheckpointError, match="committed steps: none"):
        plan_restore(cfg(restore=5), [], [], "u")


def test_restore_settings_apply_until_the_job_commits_its_own_checkpoint():
    c = cfg(restore=10, overwrite=True, restore_parts=["train.model"], strict=False)
    first = plan_restore(c, CANDS, [], "u")
    assert (first.candidates, first.parts, first.strict) == ([10], ["train.model"], False)
    later = plan_restore(c, CANDS, [], "u", committed_by_this_job=True)
    assert (later.candidates, later.parts, later.strict) == ([30, 20, 10], [], True)


def test_a_manifest_from_a_newer_orchestrator_stops_the_resume():
    rejected = [Rejected(40, "format_version 3 is newer", future_format=True)]
    with pytest.raises(CheckpointError, match="step 40 .* newer orchestrator.*Nothing was changed"):
        plan_restore(cfg(), CANDS, rejected, "u")


# --- manifest format ----------------------------------------------------------------------------


def test_a_format_1_manifest_is_migrated_forward():
    raw = json.loads((FIXTURE / "step_000000002" / "manifest.json").read_text())
    assert raw["format_version"] == 1
    manifest = Manifest.from_json(json.dumps(raw).encode())
    assert manifest.format_version == FORMAT_VERSION == 3
    assert (manifest.job_id, manifest.fencing_token) == ("", 0)
    assert manifest.data_dir == "" and manifest.parts == []
    assert manifest.hash_algorithm == "crc32"  # what format 1 used; still verifiable
    with open(FIXTURE / "step_000000002" / "__0_0.distcp", "rb") as f:
        size, checksum = checksum_stream(f, manifest.hash_algorithm)
    assert manifest.files["__0_0.distcp"] == FileEntry(size, checksum)


def test_migrations_run_one_version_at_a_time_to_the_current():
    out = migrate({"format_version": 1, "step": 1, "world_size": 1, "parallelism": "ddp",
                   "files": {}})
    assert out["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("version, message", [(FORMAT_VERSION + 1, "newer than this"),
                                              (0, "is not a version"), ("2", "is not a version")])
def test_unknown_versions_are_refused(version, message):
    body = {"format_version": version, "step": 1, "world_size": 1, "parallelism": "ddp",
            "files": {}}
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(json.dumps(body).encode())
