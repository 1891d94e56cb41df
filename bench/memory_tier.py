"""What the memory tier costs a training step: the GPT workload's step loop with a memory copy
after every step (`checkpoint.memory_interval_steps: 1`: the copy into the arena, which the
buddy maps -- both ranks are on this machine -- with the next optimizer step waiting for it),
and after every 5th, against the same loop with the tier off, side by side in one gang.

Two ranks, gloo, DDP, one torch thread per rank (as Ray's workers run: OMP_NUM_THREADS=1),
on this machine's CPUs. Per model size one gang runs rounds of one block of steps per mode
(after a warm-up block); a mode's ratio is the median over rounds of its block's time over
the tier-off block of the same round, so that the machine's drift (a shared 2-core machine
whose speed moves by tens of percent within a minute) cancels between neighbours, with the
quartiles of those ratios beside it to show how noisy the run was. `auto` copies only every
so many steps: a block holds several of its copies.
The tier's own waiting (optimizer steps blocked on the copy) is reported too.

    python bench/memory_tier.py            # about 4 minutes here

Writes bench/results/memory_tier.json and prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (workload args, steps per block, rounds)
    # 12 ms steps: many short rounds (about 90 s in all).
    "main job's GPT (default args)": ({}, 30, 40),
    # 180 ms steps: 5.5 s blocks, fewer rounds.
    "GPT 4x256": ({"n_layer": 4, "n_embd": 256, "seq_len": 128, "vocab_size": 256}, 30, 6),
}
MODES = {"off": 0, "every step": 1, "every 5 steps": 5, "auto": "auto"}
"""memory_interval_steps per mode. `auto` probes in its first block (a warm-up, not counted)
and keeps the interval it chose in the later ones, as across a run's attempts."""


def loop_rank(rank: int, world: int, groups, args: dict, steps: int, blocks: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two cores; more threads oversubscribe them

    from orchestrator.checkpoint.memory import MemoryTier
    from workloads.common import global_mean, parse_args
    from workloads.data import token_batch
    from workloads.gpt import GPTArgs, build

    a = parse_args(GPTArgs, {"steps": steps * (len(MODES) * blocks + 2), "seed": 0, **args})
    model, state = build(a, torch.device("cpu"))
    ring = dist.new_group(backend="gloo")
    checkpointed = {"train": state}

    started: set[int] = set()
    in_capture: dict[int, tuple[float, int]] = {}
    """Seconds the training thread spent inside capture(), per tier: the copy's direct cost
    (what it costs beyond that is the copy's effect on the steps around it: caches, memory
    bandwidth, the other rank's core)."""

    def run_block(tier: MemoryTier | None, first: int, interval: int | str) -> float:
        # One attempt per mode across its blocks, as in a run (an attempt lasts thousands of
        # steps): its set-up -- the layout, the arenas, mapping the buddy's -- is paid once
        # and reported apart (`setup_ms`), not once per 30-step block.
        if tier is not None and id(tier) not in started:
            started.add(id(tier))
            tier.begin_attempt(rank=rank, world_size=world, parallelism="ddp",
                               group=groups[0], ring=ring, interval_steps=interval,
                               emit=lambda *_, **__: None)
            tier.restore(checkpointed, newest_in_storage=first)  # registers the state
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(first, first + steps):
            x, y = token_batch(a.seed, state.data_position, a.batch_size, rank, world,
                               a.seq_len, a.vocab_size)
            loss = model(x, y)
            loss.backward()
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
            global_mean(loss)
            state.step, state.data_position = step, state.data_position + a.batch_size
            if tier is not None:
                c0 = time.perf_counter()
                tier.capture(step)
                spent, n = in_capture.get(id(tier), (0.0, 0))
                in_capture[id(tier)] = (spent + time.perf_counter() - c0, n + 1)
        if tier is not None:
            tier.wait_for_copy()  # this block's last copy is this block's cost
        dist.barrier()
        return time.perf_counter() - t0

    tiers = {mode: MemoryTier() for mode in MODES}
    run_block(None, 1, 0)  # warm-up
    step = steps + 1
    run_block(tiers["auto"], step, "auto")  # auto's probe
    step += steps
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(blocks):
        for mode, interval in MODES.items():
            times[mode].append(run_block(tiers[mode] if interval else None, step, interval))
            step += steps
    for tier in tiers.values():
        tier.end_attempt(timeout_s=None)
    params = sum(p.numel() for p in model.parameters())
    return {"times": times, "wait_s": {m: t.wait_s for m, t in tiers.items()},
            "capture_ms_per_step": {m: round(in_capture[id(t)][0] / in_capture[id(t)][1] * 1e3,
                                             3) for m, t in tiers.items() if id(t) in in_capture},
            "setup_ms": {m: round(t.setup_s * 1e3, 1) for m, t in tiers.items()},
            "params": params, "auto_interval": tiers["auto"].interval_steps}


def main() -> None:
    from orchestrator.local_gang import run_gang

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    rows = []
    for name, (args, steps, rounds) in SIZES.items():
        with tempfile.TemporaryDirectory() as out:
            r0 = run_gang(loop_rank, 2, args, steps, rounds, out_dir=out)[0]
        times = r0["times"]
        median = {m: statistics.median(t) for m, t in times.items()}
        paired = {m: sorted(t / o for t, o in zip(times[m], times["off"]))
                  for m in MODES if m != "off"}
        rows.append({"model": name, "args": args, "params": r0["params"],
                     "state_mb": round(r0["params"] * 3 * 4 / 2**20, 1),
                     "steps_per_block": steps, "rounds": rounds, "intervals": MODES,
                     "times_s": times,
                     "median_s": {m: round(t, 3) for m, t in median.items()},
                     "step_ms_off": round(median["off"] / steps * 1000, 1),
                     "ratio": {m: round(statistics.median(r), 3) for m, r in paired.items()},
                     "ratio_quartiles": {m: [round(q, 3) for q in
                                             statistics.quantiles(r, n=4)[::2]]
                                         for m, r in paired.items()},
                     "auto_interval_steps": r0["auto_interval"],
                     "tier_wait_s": {m: round(w, 3) for m, w in r0["wait_s"].items()},
                     "capture_ms_per_step": r0["capture_ms_per_step"],
                     "setup_ms_once_per_attempt": r0["setup_ms"]})
        print(f"{name}: " + ", ".join(f"{m} {t:.2f}s" for m, t in median.items())
              + f" per {steps} steps", flush=True)
    result = {"commit": commit, "machine": "2 cores, no GPU", "ranks": 2, "rows": rows}
    out = ROOT / "bench" / "results" / "memory_tier.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| model | params | model+AdamW state | step, tier off | every step | every 5 steps "
          "| auto (interval it chose) |")
    print("|---|---|---|---|---|---|---|")

    def cell(r: dict, mode: str) -> str:
        low, high = r["ratio_quartiles"][mode]
        return f"{r['ratio'][mode]}x ({low}-{high})"

    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['state_mb']} MB | {r['step_ms_off']} ms "
              f"| {cell(r, 'every step')} | {cell(r, 'every 5 steps')} "
              f"| {cell(r, 'auto')}, interval {r['auto_interval_steps']} |")


if __name__ == "__main__":
    main()
