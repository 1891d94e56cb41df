"""The commit protocol, on storage alone (no torch.distributed here).

Order of a save, enforced by the worker-side manager:
  1. every rank writes its DCP shards into a *new* step directory;
  2. the files are split among ranks and each rank checksums its share (`checksum_files`);
  3. the shares are gathered on rank 0 -- this is where all ranks confirm;
  4. rank 0 writes manifest.json last, atomically (`write_manifest`): the commit.
A directory without a manifest is debris and is never restored from.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.checkpoint.layout import MANIFEST, RunLayout
from orchestrator.checkpoint.manifest import FileEntry, Manifest, ManifestError, checksum_stream


def data_files(layout: RunLayout, step: int) -> list[str]:
    """Names of the files a save wrote into a step directory (all but the manifest)."""
    names = (e.name for e in layout.storage.list_dir(*layout.step_dir(step)))
    return sorted(n for n in names if n != MANIFEST and not n.startswith(".tmp-"))


def share_of(names: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the files, so that checksumming is spread over the gang."""
    return names[rank::world_size]


def checksum_files(layout: RunLayout, step: int, names: list[str]) -> dict[str, FileEntry]:
    result = {}
    for name in names:
        with layout.storage.open_read(*layout.step_dir(step), name) as f:
            size, checksum = checksum_stream(f)
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


def committed_checkpoints(layout: RunLayout) -> tuple[list[Candidate], list[Rejected]]:
    """Checkpoints whose manifest exists and whose files are all present with the right sizes,
    newest first; and the step directories that fail that cheap check, with the reason.

    Checksums are verified later, by the ranks that restore (`verify`), since that needs a
    full read of the data.
    """
    candidates, rejected = [], []
    for step in reversed(layout.step_dirs()):
        listing = {e.name: e.size for e in layout.storage.list_dir(*layout.step_dir(step))}
        if MANIFEST not in listing:
            continue  # debris of an interrupted save: not a checkpoint at all
        try:
            manifest = read_manifest(layout, step)
        except (ManifestError, OSError) as e:
            rejected.append(Rejected(step, f"manifest unreadable: {e}"))
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


def verify_files(layout: RunLayout, manifest: Manifest, names: list[str]) -> list[str]:
    """Checksum `names` against the manifest; return one line per file that does not match."""
    problems = []
    actual = checksum_files(layout, manifest.step, names)
    for name in names:
        want, got = manifest.files[name], actual[name]
        if got != want:
            problems.append(f"{name}: size {got.size} checksum {got.checksum}, "
                            f"manifest says size {want.size} checksum {want.checksum}")
    return problems
