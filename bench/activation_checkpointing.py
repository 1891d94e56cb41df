"""Activation checkpointing: memory kept for backward against step time, per mode.

For two GPT sizes (a short-sequence one, and a long-sequence one whose activations dwarf its
parameters), every mode of workloads/activation_checkpointing.py is measured in a process of
its own, one after another, on one CPU process (the trade-off is per device):
  - activation bytes: storages created in forward and alive when it returns
    (workloads/activation_memory.py);
  - peak memory: on GPU the caching allocator's peak over one training step; on CPU the rise
    of the process's peak RSS over one step, with MALLOC_MMAP_THRESHOLD_=65536 so that freed
    memory really goes back (DESIGN.md);
  - step time: median of 5 forward+backward+optimizer steps after 2 warm-up steps.
Ratios are against `none` of the same size, measured in the same run.

    python bench/activation_checkpointing.py

Writes bench/results/activation_checkpointing.json, docs/activation_checkpointing.png and
prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ["none", "full", "every_n:2", "selective", "selective:attention"]
SIZES = {
    "short-seq": {"n_layer": 4, "n_embd": 256, "n_head": 8, "seq_len": 128, "batch_size": 8},
    "long-seq": {"n_layer": 4, "n_embd": 128, "n_head": 4, "seq_len": 1024, "batch_size": 4},
}
WARMUP, TIMED = 2, 5


def measure(size: str, mode: str) -> dict:
    """Runs in a fresh process: one model, one mode."""
    import torch

    from workloads.activation_memory import ActivationMemory
    from workloads.common import seed_everything
    from workloads.data import token_batch
    from workloads.gpt import GPT, GPTArgs
    from workloads.activation_checkpointing import apply_activation_checkpointing

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    a = GPTArgs(**SIZES[size], activation_checkpointing=mode, steps=WARMUP + TIMED + 1)
    seed_everything(0)
    model = GPT(a).to(device)
    apply_activation_checkpointing(model.blocks, a.ac_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (t.to(device) for t in token_batch(0, 0, a.batch_size, 0, 1, a.seq_len, a.vocab_size))

    def step() -> None:
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # time the work, not its launch

    times = []
    for i in range(WARMUP + TIMED):
        t0 = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    with ActivationMemory() as mem:
        loss = model(x, y)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    if cuda:  # the caching allocator knows its peak
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_bytes = torch.cuda.max_memory_allocated() - before
    else:
        rss_before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        step()
        peak_bytes = (_rss_kb("VmHWM") - rss_before) * 1024
    return {"size": size, "mode": mode, "device": device.type,
            "activation_bytes": mem.live_bytes,
            "peak_bytes": peak_bytes, "step_s": statistics.median(times),
            "step_s_all": times, "params": sum(p.numel() for p in model.parameters())}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_all() -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for size in SIZES:
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--one", size, mode], env=env, cwd=ROOT,
                capture_output=True, text=True, timeout=900, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"[ac] {size:9s} {mode:20s} activations {row['activation_bytes'] / 2**20:8.1f} MiB"
                  f"  peak {row['peak_bytes'] / 2**20:8.1f} MiB  step {row['step_s']:.3f} s",
                  flush=True)
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["mode"] == "none")
        row["activation_ratio"] = row["activation_bytes"] / base["activation_bytes"]
        row["peak_ratio"] = row["peak_bytes"] / base["peak_bytes"]
        row["time_ratio"] = row["step_s"] / base["step_s"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIZES), figsize=(11, 4.2))
    for ax, size in zip(axes, SIZES):
        mine = [r for r in rows if r["size"] == size]
        ax.scatter([r["time_ratio"] for r in mine],
                   [r["activation_bytes"] / 2**20 for r in mine], s=40)
        for r in mine:
            ax.annotate(r["mode"], (r["time_ratio"], r["activation_bytes"] / 2**20),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_title(f"{size}: " + ", ".join(f"{k}={v}" for k, v in SIZES[size].items()),
                     fontsize=8)
        ax.set_xlabel("step time / step time without checkpointing")
        ax.set_ylabel("activation memory kept for backward (MiB)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.1)
    fig.suptitle("Activation checkpointing: memory against compute (GPT, CPU, one process)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "activation_checkpointing.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "activation_checkpointing.png"))
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(*args.one)))
        return
    rows = run_all()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.plot))
    print("\n| model | mode | activation MiB | ratio to none | peak MiB | ratio to none | "
          "step s | ratio to none |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['activation_bytes'] / 2**20:.1f} | "
              f"{r['activation_ratio']:.3f} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{r['peak_ratio']:.3f} | {r['step_s']:.3f} | {r['time_ratio']:.2f} |")


if __name__ == "__main__":
    main()
