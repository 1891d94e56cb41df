"""What checkpointing costs the whole training loop, per save mode: wall time of N steps with a
save every K steps against the same N steps with no saves at all, one after the other in one
run of this script. Unlike the stall figure of bench/checkpoint.py, this sees everything a
save takes from training: the call, the wait for a snapshot copy, and the CPU the overlapped
copy and the background write take from the steps beside them.

The model of bench/checkpoint.py (two ranks, gloo, FSDP2, 12 x Linear(2048): model plus AdamW
state over 0.5 GB), the loop timed from the first step to the last save committed, each mode
in a fresh gang; ROUNDS rounds, the modes' order rotated each round, medians of the rounds.

    python bench/checkpoint_loop.py             # about 8 minutes here

Writes bench/results/checkpoint_loop.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "off", "thread", "process")


def _bench_checkpoint():
    """bench/checkpoint.py, for its model (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_checkpoint",
                                                  ROOT / "bench" / "checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_rank(rank: int, world: int, groups, mode: str, root: str, layers: int, width: int,
              batch: int, steps: int, every: int) -> dict:
    import torch
    import torch.distributed as dist

    from orchestrator.chaos.inject import FaultInjector
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.manager import CheckpointManager
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import CheckpointConfig

    model, optimizer, state = _bench_checkpoint().build(rank, world, layers, width)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    layout = RunLayout(Storage(root), "run")
    manager = None
    if mode != "none":
        manager = CheckpointManager(
            layout=layout, rank=rank, world_size=world, parallelism="fsdp", group=groups[0],
            save_group=groups[1], config=CheckpointConfig(async_mode=mode),
            faults=FaultInjector([], rank, layout), emit=lambda kind, **f: None)
    # One warm-up step, untimed: the first step allocates the optimizer state.
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if manager is not None and step % every == 0:
            manager.save(step, {"train": state}, {})
    if manager is not None:
        manager.settle()  # the loop is done when its last checkpoint is committed
    dist.barrier()
    wall_s = time.perf_counter() - t0
    if manager is not None:
        manager.close()
    return {"mode": mode, "wall_s": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=str(ROOT / "bench" / "results"),
                        help="where checkpoints are written (the filesystem measured)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_loop.json"))
    args = parser.parse_args()

    from orchestrator.local_gang import run_gang

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    base = Path(tempfile.mkdtemp(prefix="ckpt-loop-", dir=args.dir))
    try:
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                root = base / f"{mode}-{r}"
                root.mkdir()
                ranks = run_gang(loop_rank, 2, mode, str(root), args.layers, args.width,
                                 args.batch, args.steps, args.every, out_dir=str(root),
                                 timeout_s=1800)
                walls[mode].append(max(x["wall_s"] for x in ranks))
                print(f"[round {r + 1}] {mode}: {walls[mode][-1]:.2f} s", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    none = statistics.median(walls["none"])
    results = {"commit": commit, "setup": vars(args), "wall_s": walls,
               "median_s": {m: statistics.median(w) for m, w in walls.items()},
               "vs_no_checkpoints": {m: statistics.median(w) / none for m, w in walls.items()}}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{args.steps} steps, a save every {args.every}, {args.rounds} rounds (medians)\n")
    print("| save mode | whole loop | vs no checkpoints | rounds (s) |\n|---|---|---|---|")
    names = {"none": "no checkpoints", "off": "ours, `async_mode: off` (sync)",
             "thread": "ours, `async_mode: thread`", "process": "ours, `async_mode: process`"}
    for mode in MODES:
        print(f"| {names[mode]} | {results['median_s'][mode]:.1f} s | "
              f"{results['vs_no_checkpoints'][mode]:.2f}x | "
              f"{' '.join(f'{w:.1f}' for w in walls[mode])} |")


if __name__ == "__main__":
    main()
