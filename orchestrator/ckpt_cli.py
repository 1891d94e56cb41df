"""`orchestrator ckpt ls|show|verify|gc|export|import`: look after a run's checkpoints.

A run URL is the run's folder: `<run.storage>/<run.name>`, e.g. `./runs/demo` or
`s3://bucket/runs/demo`. Nothing here needs Ray or a GPU.
Exit codes: 0 done, 1 a checkpoint is invalid (verify) or nothing to act on, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import CheckpointError, StorageError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
GC_MIN_AGE_S = 3600.0


def add_parser(sub: Any) -> None:
    ckpt = sub.add_parser("ckpt", help="list, check, clean, export and import checkpoints")
    actions = ckpt.add_subparsers(dest="action", required=True)

    ls = actions.add_parser("ls", help="table of the run's checkpoints")
    ls.add_argument("run_url")
    ls.add_argument("--json", action="store_true", help="one JSON list instead of a table")

    show = actions.add_parser("show", help="one checkpoint's manifest and tensors")
    show.add_argument("run_url")
    show.add_argument("--step", type=int, help="default: the latest committed")
    show.add_argument("--json", action="store_true")

    verify = actions.add_parser("verify", help="check every file against the manifest")
    verify.add_argument("run_url")
    verify.add_argument("--step", type=int, help="default: every committed checkpoint")

    gc = actions.add_parser("gc", help="remove debris of interrupted saves")
    gc.add_argument("run_url")
    gc.add_argument("--min-age-s", type=float, default=GC_MIN_AGE_S,
                    help="leave debris changed more recently than this: it may be a save in "
                         f"flight of a job still running (default {GC_MIN_AGE_S:.0f})")
    gc.add_argument("--dry-run", action="store_true", help="list, remove nothing")

    export = actions.add_parser("export", help="one consolidated safetensors or torch file")
    export.add_argument("run_url")
    export.add_argument("out", type=Path)
    export.add_argument("--step", type=int, help="default: the latest committed")
    export.add_argument("--format", choices=("safetensors", "torch"), default=None,
                        help="default: from the file name (.safetensors, else torch)")
    export.add_argument("--with-optimizer", action="store_true",
                        help="include the optimizer state (default: the model only)")

    imp = actions.add_parser("import", help="a state dict file as a new run's initial weights")
    imp.add_argument("source", type=Path)
    imp.add_argument("run_url")


def main(args: argparse.Namespace) -> int:
    try:
        layout = open_run(args.run_url)
        return _ACTIONS[args.action](layout, args)
    except (StorageError, CheckpointError, ValueError) as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_PROBLEM


def open_run(url: str):
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import RunConfig

    url = url.rstrip("/")
    storage_url, sep, name = url.rpartition("/")
    if not sep or not name or storage_url.endswith(":/"):
        raise ValueError(f"{url!r}: give the run's folder, <storage>/<run name>")
    config = RunConfig(name=name, storage=storage_url or "/")
    return RunLayout(Storage(config.storage_url), name)


def open_existing_run(run: str, storage: str):
    """The run `run` names (its folder, or a name under `storage`), which must have an event
    log; ValueError (one line, exit 2) if there is no run there."""
    from orchestrator.events import has_event_log

    layout = open_run(run if "/" in run else f"{storage.rstrip('/')}/{run}")
    if not has_event_log(layout):
        raise ValueError(f"{layout.storage.url_of(layout.run_name)}: no run there (no "
                         "event log); give the run's folder, <storage>/<run name>")
    return layout


def _committed(layout, step: int | None) -> list:
    from orchestrator.checkpoint.commit import committed_checkpoints

    candidates, _ = committed_checkpoints(layout)
    where = layout.storage.url_of(layout.run_name)
    if not candidates:
        raise CheckpointError(f"no committed checkpoints in {where}")
    if step is None:
        return candidates
    chosen = [c for c in candidates if c.step == step]
    if not chosen:
        have = ", ".join(str(c.step) for c in reversed(candidates))
        raise CheckpointError(f"step {step} has no committed checkpoint in {where} "
                              f"(committed steps: {have})")
    return chosen


# --- actions -------------------------------------------------------------------------------


def _ls(layout, args) -> int:
    rows = checkpoint_rows(layout)
    if not rows:
        print(f"orchestrator: no checkpoints in {layout.storage.url_of(layout.run_name)}",
              file=sys.stderr)
        return EXIT_PROBLEM
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    table = [("STEP", "COMMITTED", "SIZE", "METRICS", "AGE")]
    for r in rows:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())) or "-"
        age = _human_age(r["age_s"]) if r["age_s"] is not None else "-"
        table.append((str(r["step"]), r["committed"], _human_bytes(r["bytes"]), metrics, age))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return EXIT_OK


def checkpoint_rows(layout) -> list[dict[str, Any]]:
    """One row per step folder, oldest first: committed, invalid, debris or unreadable."""
    from orchestrator.checkpoint import commit
    from orchestrator.checkpoint.manifest import FutureFormatError, ManifestError

    storage, now, rows = layout.storage, time.time(), []
    for step in layout.step_dirs():
        row: dict[str, Any] = {"step": step, "metrics": {}, "bytes": 0, "age_s": None}
        if not storage.exists(*layout.manifest(step)):
            row["committed"] = "no (debris)"
            row["bytes"], mtime = storage.tree_stats(*layout.step_dir(step))
            row["age_s"] = None if mtime is None else round(now - mtime, 1)
        else:
            try:
                manifest = commit.read_manifest(layout, step)
                invalid = storage.exists(*layout.invalid_marker(step))
                row["committed"] = "invalid" if invalid else "yes"
                row.update(bytes=manifest.total_bytes, metrics=manifest.metrics,
                           age_s=round(now - manifest.created_at, 1),
                           world_size=manifest.world_size, parallelism=manifest.parallelism)
            except FutureFormatError:
                row["committed"] = "newer format"
            except (ManifestError, OSError):
                row["committed"] = "unreadable manifest"
        rows.append(row)
    return rows


def _show(layout, args) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from orchestrator.checkpoint.writer import reader

    (candidate, *_) = _committed(layout, args.step)
    m = candidate.manifest
    metadata = reader(layout, m.step, m.data_dir).read_metadata()
    tensors = {k: {"shape": list(v.size), "dtype": str(v.properties.dtype).removeprefix("torch.")}
               for k, v in sorted(metadata.state_dict_metadata.items())
               if isinstance(v, TensorStorageMetadata)}
    # The version as written, not as migrated on reading.
    on_disk = json.loads(layout.storage.read_bytes(*layout.manifest(m.step)))["format_version"]
    info = {"step": m.step, "world_size": m.world_size, "parallelism": m.parallelism,
            "format_version": on_disk, "hash_algorithm": m.hash_algorithm,
            "data_dir": m.data_dir, "parts": m.parts, "metrics": m.metrics,
            "files": len(m.files), "bytes": m.total_bytes, "created_at": m.created_at,
            "torch_version": m.torch_version, "orchestrator_version": m.orchestrator_version,
            "tensors": tensors}
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    for k, v in info.items():
        if k != "tensors":
            print(f"{k}: {v}")
    print(f"tensors ({len(tensors)}):")
    for name, t in tensors.items():
        print(f"  {name}  {t['dtype']}{t['shape']}")
    return EXIT_OK


def _verify(layout, args) -> int:
    from orchestrator.checkpoint import commit
    from orchestrator.checkpoint.consolidate import unsafe_content

    bad = 0
    for candidate in reversed(_committed(layout, args.step)):
        t0 = time.monotonic()
        m = candidate.manifest
        problems = commit.verify_files(layout, m, sorted(m.files)).problems
        if not problems:
            # Checksums catch accidents; whoever can write the storage can rewrite them too.
            refused = unsafe_content(layout, m.step, m.data_dir)
            problems = [f"refused: {refused}"] if refused else []
        took = time.monotonic() - t0
        if problems:
            bad += 1
            print(f"step {m.step}: INVALID")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"step {m.step}: ok ({len(m.files)} files, {_human_bytes(m.total_bytes)}, "
                  f"{m.hash_algorithm}, {took:.2f}s)")
    # Checkpoints the cheap checks already reject (missing files, wrong sizes) are invalid too.
    if args.step is None:
        _, rejected = commit.committed_checkpoints(layout)
        for r in rejected:
            bad += 1
            print(f"step {r.step}: INVALID\n  {r.reason}")
    return EXIT_PROBLEM if bad else EXIT_OK


def _gc(layout, args) -> int:
    from orchestrator.checkpoint.housekeeping import find_debris, remove_debris

    debris = find_debris(layout, min_age_s=args.min_age_s)
    verb = "would remove" if args.dry_run else "removing"
    for d in debris:
        print(f"{verb} {'/'.join(d.parts[1:])}: {d.reason}")
    if not args.dry_run:
        remove_debris(layout, debris)
    print(f"{len(debris)} item(s) {'found' if args.dry_run else 'removed'}; debris changed in "
          f"the last {args.min_age_s:.0f}s was left alone (it may be a save in flight)")
    return EXIT_OK


def _export(layout, args) -> int:
    from orchestrator.checkpoint.transfer import export

    (candidate, *_) = _committed(layout, args.step)
    fmt = args.format or ("safetensors" if args.out.suffix == ".safetensors" else "torch")
    done = export(layout, candidate.step, args.out, fmt, args.with_optimizer)
    print(f"exported step {done['step']} ({done['tensors']} model tensors"
          f"{' and the optimizer state' if done['with_optimizer'] else ''}) to {args.out} "
          f"({_human_bytes(done['bytes'])}, {fmt})")
    return EXIT_OK


def _import(layout, args) -> int:
    from orchestrator.checkpoint.transfer import import_weights

    manifest = import_weights(args.source, layout)
    print(f"imported {args.source} as step 0 of {layout.storage.url_of(layout.run_name)} "
          f"({_human_bytes(manifest.total_bytes)}, model only); `orchestrator run` with "
          f"run.name={layout.run_name} starts from these weights")
    return EXIT_OK


_ACTIONS = {"ls": _ls, "show": _show, "verify": _verify, "gc": _gc, "export": _export,
            "import": _import}


# --- formatting ----------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _human_age(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"
