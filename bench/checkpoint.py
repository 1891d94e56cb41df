"""Checkpoint saves and restores: training stall, throughput, checksum cost; side by side.

Two ranks (local processes, gloo, FSDP2) train a stack of wide linear layers whose model plus
AdamW state is over 500 MB, and checkpoint it every few steps, in each of:

  off           our sync save: the training thread writes, checksums and commits
  thread        our async save: snapshot copied during the next step, a thread writes
  process       our async save: as thread, a child process per rank writes
  dcp_async     plain `torch.distributed.checkpoint.async_save` (its default stager copies
                the whole state before returning), for comparison
  dcp_sync      plain `dcp.save` with FileSystemWriter(sync_files=True), for comparison

Stall = the time the training thread is blocked by checkpointing: the save call, plus (async)
the wait of the next optimizer step for the snapshot copy, plus any wait for a previous save.
Save throughput = checkpoint bytes / wall time of a whole sync save (write, checksums, commit),
against `dd if=/dev/zero conv=fsync` writing the same number of bytes to the same filesystem,
interleaved with it, each after `sync` and a second of quiet. Restore throughput = bytes / (verify + load) into a fresh model.
Checksum cost = our sync save against the same save with the checksum taken out (the
writer's hasher replaced by one that does nothing, in these trials only), interleaved with the
others; also the time to xxh3 the saved bytes in memory over a save, for reference.
With `--dir /dev/shm` the writes are memory copies: dd against our save there isolates our
own overhead (serialization, hashing, the commit) from the disk's noise.

    python bench/checkpoint.py                 # about 5 minutes here
    python bench/checkpoint.py --layers 6      # a smaller model, for a quick look
    python bench/checkpoint.py --dir /dev/shm --modes off --out bench/results/checkpoint_tmpfs.json

Writes bench/results/checkpoint.json and prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("off", "thread", "process", "dcp_async", "dcp_sync")


def build(rank: int, world: int, layers: int, width: int):
    import torch
    import torch.nn as nn

    from orchestrator.context import TrainState
    from workloads.common import seed_everything, wrap_for_parallelism

    torch.set_num_threads(1)  # two ranks on two cores
    seed_everything(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]
    model = wrap_for_parallelism(nn.Sequential(*blocks), blocks, "fsdp", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, TrainState(model, optimizer)


def bench_rank(rank: int, world: int, groups, mode: str, root: str, layers: int, width: int,
               batch: int, steps: int, every: int, trials: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from orchestrator.chaos.inject import FaultInjector
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.manager import CheckpointManager
    from orchestrator.checkpoint.selection import RestorePlan
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import CheckpointConfig

    model, optimizer, state = build(rank, world, layers, width)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    layout = RunLayout(Storage(root), "run")
    events: list[dict] = []
    ours = mode in ("off", "thread", "process")

    def new_manager(async_mode: str) -> CheckpointManager:
        return CheckpointManager(
            layout=layout, rank=rank, world_size=world, parallelism="fsdp", group=groups[0],
            save_group=groups[1], config=CheckpointConfig(async_mode=async_mode),
            faults=FaultInjector([], rank, layout),
            emit=lambda kind, **f: events.append({"kind": kind, **f}))

    manager = new_manager(mode if ours else "off")
    step_s, stalls, pending = [], [], None
    for step in range(1, steps + 1):
        before = manager.stall_s
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_step = time.perf_counter() - t0
        step_s.append(t_step)
        blocked = manager.stall_s - before  # the optimizer's wait for a snapshot copy
        if step % every == 0:
            t1 = time.perf_counter()
            if ours:
                manager.save(step, {"train": state}, {})
            elif mode == "dcp_async":
                if pending is not None:
                    pending.result()
                pending = dcp.async_save({"train": state}, storage_writer=FileSystemWriter(
                    f"{root}/dcp/{step}", sync_files=True), process_group=groups[1])
            else:
                dcp.save({"train": state}, storage_writer=FileSystemWriter(
                    f"{root}/dcp/{step}", sync_files=True), process_group=groups[0])
            stalls.append({"step": step, "call_s": time.perf_counter() - t1})
        if stalls and stalls[-1]["step"] == step - 1:
            stalls[-1]["next_step_wait_s"] = blocked
    t_end = time.perf_counter()
    if ours:
        manager.settle()
    elif pending is not None:
        pending.result()
    drain_s = time.perf_counter() - t_end
    dist.barrier()

    result = {"mode": mode, "step_s": step_s, "stalls": stalls, "drain_s": drain_s,
              "events": events}
    if mode == "off":
        result["throughput"] = throughput_trials(rank, groups, manager, state, layout, root,
                                                 steps - steps % every, trials)
        # Restore the last checkpoint into a fresh model (verify + load), timed.
        model2, optimizer2, state2 = build(rank, world, layers, width)
        manager2 = new_manager("off")
        dist.barrier()
        t0 = time.perf_counter()
        manager2.restore({"train": state2}, RestorePlan(candidates=[steps - steps % every]))
        dist.barrier()
        result["restore_s"] = time.perf_counter() - t0
        manager2.close()
    manager.close()
    return result


def throughput_trials(rank, groups, manager, state, layout, root, last_step,
                      n_trials: int) -> list[dict]:
    """dd, our sync save and a plain DCP save, interleaved, each after `sync` so that none
    inherits the others' dirty pages (this disk writes ~2 GB/s in bursts, far less when
    writeback of earlier data competes)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from orchestrator.checkpoint import commit

    total = commit.read_manifest(layout, last_step).total_bytes
    trials = []

    def quiet() -> None:
        dist.barrier()
        if rank == 0:
            subprocess.run(["sync"], check=True)
            time.sleep(1.0)
        dist.barrier()

    def dd() -> None:
        if rank == 0:
            trial["dd_s"] = dd_seconds(Path(root), total)

    def dd_parallel() -> None:
        # One dd per rank, each writing half, at once: the same parallelism as a 2-rank save.
        t0 = time.perf_counter()
        dd_seconds(Path(root), total // 2, f"dd{rank}.bin")
        dist.barrier()
        trial["dd2_s"] = time.perf_counter() - t0

    def ours() -> None:
        t0 = time.perf_counter()
        manager.save(10_000 + i, {"train": state}, {})
        dist.barrier()
        trial["ours_s"] = time.perf_counter() - t0

    def ours_without_checksum() -> None:
        with hashing_disabled():
            t0 = time.perf_counter()
            manager.save(20_000 + i, {"train": state}, {})
            dist.barrier()
            trial["ours_nohash_s"] = time.perf_counter() - t0

    def plain() -> None:
        t0 = time.perf_counter()
        dcp.save({"train": state}, storage_writer=FileSystemWriter(
            f"{root}/plain/{i}", sync_files=True), process_group=groups[0])
        dist.barrier()
        trial["dcp_s"] = time.perf_counter() - t0

    # The disk of this machine is noisy (the same dd takes 0.3 to 1.1 s): many trials, the
    # order rotated from one to the next, and per-trial ratios.
    order = [dd, ours, dd_parallel, ours_without_checksum, plain]
    for i in range(n_trials):
        trial: dict = {"bytes": total}
        for measure in order[i % len(order):] + order[:i % len(order)]:
            quiet()
            measure()
        trials.append(trial)
        # The trial's saves are only timed: removed, so that trials do not add up (on
        # tmpfs, in memory: 15 trials of three 0.6 GB saves each ran this machine out).
        dist.barrier()
        if rank == 0:
            for step in (10_000 + i, 20_000 + i):
                layout.storage.remove_tree(*layout.step_dir(step))
            shutil.rmtree(f"{root}/plain/{i}", ignore_errors=True)
        dist.barrier()
    return trials


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 16


@contextlib.contextmanager
def hashing_disabled():
    """Our save minus its checksum: the writer's hasher does nothing. (The manifest then
    records checksums no restore would accept; these saves are only timed.)"""
    from orchestrator.checkpoint import writer

    real = writer.new_hasher
    writer.new_hasher = lambda *a: _NoHash()
    try:
        yield
    finally:
        writer.new_hasher = real


def dd_seconds(folder: Path, total_bytes: int, name: str = "dd.bin") -> float:
    """Seconds for dd to write `total_bytes` of zeros with a final fsync (1 MiB blocks)."""
    block = 1 << 20
    target = folder / name
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={block}",
                    f"count={total_bytes // block}", "conv=fsync"], check=True,
                   capture_output=True)
    took = time.perf_counter() - t0
    target.unlink()
    return took * total_bytes / (total_bytes // block * block)


def checksum_seconds(files: list[Path]) -> float:
    import xxhash

    total = 0.0
    for f in files:
        data = f.read_bytes()
        t0 = time.perf_counter()
        xxhash.xxh3_64(data).hexdigest()
        total += time.perf_counter() - t0
    return total


def run(args) -> dict:
    from orchestrator.local_gang import run_gang

    results: dict = {"model": {"layers": args.layers, "width": args.width,
                               "batch": args.batch, "steps": args.steps, "every": args.every},
                     "modes": {}}
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        for mode in args.modes:
            root = base / mode
            root.mkdir()
            print(f"[{mode}] ...", flush=True)
            ranks = run_gang(bench_rank, 2, mode, str(root), args.layers, args.width,
                             args.batch, args.steps, args.every, args.trials,
                             out_dir=str(root),
                             timeout_s=1800)
            results["modes"][mode] = summarize(mode, ranks, root, args.every)
            if mode == "off":
                results["throughput"] = [
                    {**t, **{k: max(r["throughput"][i][k] for r in ranks)
                             for k in ("ours_s", "ours_nohash_s", "dcp_s", "dd2_s")}}
                    for i, t in enumerate(ranks[0]["throughput"])]
                files = [p for p in (root / "run" / "checkpoints").rglob("*") if p.is_file()
                         and p.parent.name.startswith("save-")]
                last = max(p.parent.parent.name for p in files)
                results["checksum_s"] = checksum_seconds(
                    [p for p in files if p.parent.parent.name == last])
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def summarize(mode: str, ranks: list[dict], root: Path, every: int) -> dict:
    # A save stalls training until the slowest rank is free again.
    per_save = []
    for i in range(len(ranks[0]["stalls"])):
        per_save.append(max(r["stalls"][i]["call_s"] + r["stalls"][i].get("next_step_wait_s", 0.0)
                            for r in ranks))
    # Steps untouched by a save: not the first (warm-up), not one right after a save.
    steps_without = [s for r in ranks for i, s in enumerate(r["step_s"], 1)
                     if i > 1 and i % every != 1 % every]
    out = {"stall_s": per_save, "stall_median_s": statistics.median(per_save),
           "step_median_s": statistics.median(steps_without)}
    committed = [e for r in ranks for e in r["events"] if e["kind"] == "checkpoint_committed"]
    if committed:
        out["bytes"] = committed[-1]["bytes"]
        out["save_s"] = [e["total_s"] for e in committed]
    if mode == "off":
        out["restore_s"] = max(r["restore_s"] for r in ranks)
        restored = [e for r in ranks for e in r["events"] if e["kind"] == "checkpoint_restored"]
        out["restore_verify_s"] = restored[0]["verify_s"]
    if mode == "dcp_sync":
        out["save_s"] = per_save
        out["bytes"] = sum(p.stat().st_size for p in (root / "dcp").rglob("*") if p.is_file()
                           ) // max(1, len(per_save))
    return out


def table(r: dict) -> str:
    m = r["modes"]
    sync = m["off"]["stall_median_s"]
    gb = m["off"]["bytes"] / 1e9
    lines = [f"Model + AdamW state: {gb:.2f} GB over 2 ranks (FSDP2), "
             f"{r['model']['layers']} x Linear({r['model']['width']}), "
             f"median step {m['off']['step_median_s']:.2f} s; a save every "
             f"{r['model']['every']} steps, medians over the saves.", "",
             "| save | training stall per checkpoint | vs our sync save |", "|---|---|---|"]
    names = {"off": "ours, `async_mode: off`", "thread": "ours, `async_mode: thread`",
             "process": "ours, `async_mode: process`", "dcp_async": "plain DCP `async_save`",
             "dcp_sync": "plain DCP `save`"}
    for mode in MODES:
        if mode in m:
            s = m[mode]["stall_median_s"]
            lines.append(f"| {names[mode]} | {s:.3f} s | {s / sync:.3f} |")
    save_s = statistics.median(m["off"]["save_s"])
    trials = r["throughput"]
    gbps = {k: statistics.median(t["bytes"] / t[k] / 1e9 for t in trials)
            for k in ("dd_s", "dd2_s", "ours_s", "ours_nohash_s", "dcp_s")}

    def vs(base: str, k: str) -> str:
        ratios = [t[base] / t[k] for t in trials]
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    best = {k: max(t["bytes"] / t[k] / 1e9 for t in trials) for k in gbps}
    lines += ["", f"Throughput: {len(trials)} trials, each writing with dd, our save (with and "
                  "without its checksum) and plain DCP in turn (order rotated), each after "
                  "`sync` and 1 s of quiet. Median GB/s, best GB/s, and the median of the "
                  "per-trial ratios (range in brackets).", "",
              "| write of the whole state | median GB/s | best GB/s | vs one dd | "
              "vs two dd at once |", "|---|---|---|---|---|",
              f"| dd if=/dev/zero bs=1M conv=fsync | {gbps['dd_s']:.2f} | {best['dd_s']:.2f} | "
              f"1.00 | {vs('dd2_s', 'dd_s')} |",
              f"| two dd at once, half each | {gbps['dd2_s']:.2f} | {best['dd2_s']:.2f} | "
              f"{vs('dd_s', 'dd2_s')} | 1.00 |",
              f"| our sync save (write, checksums, commit) | {gbps['ours_s']:.2f} | "
              f"{best['ours_s']:.2f} | {vs('dd_s', 'ours_s')} | {vs('dd2_s', 'ours_s')} |",
              f"| our sync save without the checksum | {gbps['ours_nohash_s']:.2f} | "
              f"{best['ours_nohash_s']:.2f} | {vs('dd_s', 'ours_nohash_s')} | "
              f"{vs('dd2_s', 'ours_nohash_s')} |",
              f"| plain DCP save | {gbps['dcp_s']:.2f} | {best['dcp_s']:.2f} | "
              f"{vs('dd_s', 'dcp_s')} | {vs('dd2_s', 'dcp_s')} |"]
    restore = m["off"]["restore_s"]
    lines += [f"| our restore (verify + load), one trial | {gb / restore:.2f} | - | - | - |", "",
              "Checksum cost: our save with the checksum against the same save without, per "
              f"trial: {vs('ours_s', 'ours_nohash_s')} (time with / time without; median, "
              f"range). For reference, xxh3-64 of the saved bytes in memory takes "
              f"{r['checksum_s']:.3f} s, {r['checksum_s'] / save_s:.1%} of a sync save "
              f"({save_s:.2f} s). Verification on restore took "
              f"{m['off']['restore_verify_s']:.2f} s of {restore:.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--trials", type=int, default=7,
                        help="throughput trials (each: dd, our save with and without its "
                             "checksum, two dd at once, plain DCP)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dir", default=str(ROOT / "bench" / "results"),
                        help="where checkpoints are written (the filesystem measured)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint.json"))
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the results already in --out; run nothing")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if "off" not in args.modes:
        parser.error("--modes must include off (the reference)")
    os.makedirs(args.dir, exist_ok=True)
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
