"""The commit protocol, on storage alone (no torch.distributed here).

Order of a save, enforced by the worker-side manager:
  1. every rank writes its DCP shards into a *new* save folder inside the step directory,
     hashing each file as it goes (writer.py);
  2. the checksums are gathered on rank 0 -- this is where all ranks confirm;
  3. rank 0 writes manifest.json last, atomically (`write_manifest`): the commit. The manifest
     names the save folder, so a save written beside an older committed one of the same step
     (overwrite) replaces it in that one atomic write, and the two saves' files never mix.
A step directory without a manifest, or a save folder its manifest does not name, is debris
and is never restored from (gc.py removes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.checkpoint.layout import INVALID, MANIFEST, SAVE_DIR_PREFIX, RunLayout
from orchestrator.checkpoint.manifest import (
    HASH_ALGORITHM, FileEntry, FutureFormatError, Manifest, ManifestError, checksum_stream,
)


def data_files(layout: RunLayout, step: int, data_dir: str) -> list[str]:
    """Names of the files a save wrote into its folder."""
    names = (e.name for e in layout.storage.list_dir(*layout.data_dir(step, data_dir)))
    return sorted(n for n in names if n not in (MANIFEST, INVALID) and not n.startswith(".tmp-")
                  and not n.startswith(SAVE_DIR_PREFIX))


def share_of(names: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the files, so that checksumming is spread over the gang."""
    return names[rank::world_size]


def checksum_files(layout: RunLayout, step: int, data_dir: str, names: list[str],
                   algorithm: str = HASH_ALGORITHM) -> dict[str, FileEntry]:
    result = {}
    for name in names:
        with layout.storage.open_read(*layout.data_dir(step, data_dir), name) as f:
            size, checksum = checksum_stream(f, algorithm)
        result[name] = FileEntry(size=size, checksum=checksum)
    return result


def write_manifest(layout: RunLayout, manifest: Manifest) -> None:
    """The commit. Call only after every rank's shards are written and checksummed."""
    layout.storage.write_atomic(manifest.to_json(), *layout.manifest(manifest.step))


def read_manifest(layout: RunLayout, step: int) -> Manifest:
    return Manifest.from_json(layout.storage.read_bytes(*layout.manifest(step)))


@dataclass(frozen=True)
class Candidate:
    """A step directory with a readable manifest: committed, not yet checksum-verified."""

    step: int
    manifest: Manifest


@dataclass(frozen=True)
class Rejected:
    step: int
    reason: str
    future_format: bool = False
    """The manifest comes from a newer orchestrator: leave it alone, and do not resume."""
    marked_invalid: bool = False
    """An earlier restore already marked it invalid (housekeeping.mark_invalid)."""
    unreadable: bool = False
    """Reading it failed (EIO, a timeout, a 503, a permission error): that proves nothing
    about it. Skipped for now, never marked invalid; a later look may find it good."""

    @property
    def proven_bad(self) -> bool:
        """Whether a completed read showed its content wrong (the one reason to mark it)."""
        return not (self.future_format or self.marked_invalid or self.unreadable)


@dataclass(frozen=True)
class Verification:
    """What checksumming some files of a checkpoint found."""

    mismatched: list[str]
    """Files read whole whose size or checksum differs from the manifest: proof."""
    unreadable: list[str]
    """Files that could not be read, after retries: no proof of anything."""

    @property
    def problems(self) -> list[str]:
        return self.mismatched + self.unreadable


def committed_checkpoints(layout: RunLayout) -> tuple[list[Candidate], list[Rejected]]:
    """Checkpoints whose manifest exists and whose files are all present with the right sizes,
    newest first; and the step directories that fail that cheap check, with the reason.

    Checksums are verified later, by the ranks that restore (`verify`), since that needs a
    full read of the data.
    """
    candidates, rejected = [], []
    for step in reversed(layout.step_dirs()):
        # One listing answers "committed?", "marked invalid?" and, for format 1, the sizes.
        try:
            in_step_dir = {e.name: e.size
                           for e in layout.storage.list_dir(*layout.step_dir(step))}
        except OSError as e:
            rejected.append(Rejected(step, f"cannot be listed: {_reason(e)}", unreadable=True))
            continue
        if MANIFEST not in in_step_dir:
            continue  # debris of an interrupted save: not a checkpoint at all
        try:
            manifest = read_manifest(layout, step)
        except FutureFormatError as e:
            rejected.append(Rejected(step, str(e), future_format=True))
            continue
        except ManifestError as e:  # read whole, and not a manifest: proof
            rejected.append(Rejected(step, f"manifest malformed: {e}"))
            continue
        except OSError as e:  # the read failed (after retries): proves nothing
            rejected.append(Rejected(step, f"manifest cannot be read now: {_reason(e)}",
                                     unreadable=True))
            continue
        if INVALID in in_step_dir:
            rejected.append(Rejected(step, "marked invalid by an earlier restore: "
                                           f"{invalid_reason(layout, step)}",
                                     marked_invalid=True))
            continue
        try:
            listing = in_step_dir if not manifest.data_dir else {
                e.name: e.size for e in
                layout.storage.list_dir(*layout.data_dir(step, manifest.data_dir))}
        except OSError as e:
            rejected.append(Rejected(step, f"cannot be listed: {_reason(e)}", unreadable=True))
            continue
        problem = _size_problem(manifest, listing)
        if problem:
            rejected.append(Rejected(step, problem))
        else:
            candidates.append(Candidate(step, manifest))
    return candidates, rejected


def _size_problem(manifest: Manifest, listing: dict[str, int]) -> str | None:
    for name, entry in sorted(manifest.files.items()):
        if name not in listing:
            return f"{name} is missing"
        if listing[name] != entry.size:
            return f"{name} has {listing[name]} bytes, the manifest says {entry.size}"
    return None


def verify_files(layout: RunLayout, manifest: Manifest, names: list[str]) -> Verification:
    """Checksum `names` against the manifest (each file read whole, retried on transient
    errors): the files that do not match, and those that could not be read."""
    mismatched, unreadable = [], []
    for name in names:
        want = manifest.files[name]
        try:
            got = layout.storage.retry(
                lambda: checksum_files(layout, manifest.step, manifest.data_dir, [name],
                                       manifest.hash_algorithm)[name], f"checksum {name}")
        except OSError as e:
            unreadable.append(f"{name}: cannot be read now: {_reason(e)}")
            continue
        if got != want:
            mismatched.append(f"{name}: size {got.size} checksum {got.checksum}, "
                              f"manifest says size {want.size} checksum {want.checksum}")
    return Verification(mismatched, unreadable)


def _reason(e: BaseException) -> str:
    """The error's type and errno or short message: never a botocore message in full."""
    detail = getattr(e, "strerror", None) or str(e)[:120]
    return f"{type(e).__name__} ({detail})"


def invalid_reason(layout: RunLayout, step: int) -> str:
    try:
        problems = json.loads(layout.storage.read_bytes(*layout.invalid_marker(step)))["problems"]
        return "; ".join(problems)[:500]
    except (OSError, ValueError, KeyError, TypeError):
        return "(reason unreadable)"


def delete_checkpoint(layout: RunLayout, step: int) -> None:
    """Remove a committed checkpoint: the manifest first, so that an interruption leaves
    debris (ignored, and removed by gc) rather than a checkpoint with missing files."""
    storage = layout.storage
    if storage.exists(*layout.manifest(step)):
        storage.remove_file(*layout.manifest(step))
    storage.remove_tree(*layout.step_dir(step))
