"""The event log on S3: time per event as the log grows, ours (segments) against the old
way (the whole log rewritten per event), on moto's server on 127.0.0.1.

Every event here is of a kind flushed at once (the worst case: progress events are
buffered). Ours writes 10,000; the old way 2,000 (its cost grows with the log, so more
would take minutes). Time per event is reported per block of 500 events.

    python bench/events.py      # about 2 minutes here

Writes bench/results/events.json and prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BLOCK = 500


def old_way(layout, n: int) -> list[float]:
    """events.py before segments: every event rewrote the whole log."""
    lines, per_block, t0 = [], [], time.perf_counter()
    for i in range(n):
        lines.append(json.dumps({"time": time.time(), "kind": "checkpoint_committed", "i": i}))
        layout.storage.write_atomic(("\n".join(lines) + "\n").encode(), *layout.events)
        if (i + 1) % BLOCK == 0:
            per_block.append((time.perf_counter() - t0) / BLOCK)
            t0 = time.perf_counter()
    return per_block


def ours(layout, n: int) -> list[float]:
    from orchestrator.events import EventLog

    log, per_block, t0 = EventLog(layout), [], time.perf_counter()
    for i in range(n):
        log.emit("checkpoint_committed", i=i)
        if (i + 1) % BLOCK == 0:
            per_block.append((time.perf_counter() - t0) / BLOCK)
            t0 = time.perf_counter()
    return per_block


def main() -> None:
    import logging

    from data import start_s3  # bench/data.py: moto on loopback, AWS variables set

    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.events import read_events

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    bucket = start_s3()
    storage = Storage(f"{bucket}/runs")
    ours_s = ours(RunLayout(storage, f"ours-{uuid.uuid4().hex[:6]}"), 10_000)
    old_s = old_way(RunLayout(storage, f"old-{uuid.uuid4().hex[:6]}"), 2_000)
    layout = RunLayout(storage, "check")
    log = __import__("orchestrator.events", fromlist=["EventLog"]).EventLog(layout)
    for i in range(1234):
        log.emit("x", i=i)
    assert [e["i"] for e in read_events(layout)] == list(range(1234))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "block": BLOCK,
               "ours_ms_per_event": [round(1000 * s, 3) for s in ours_s],
               "old_ms_per_event": [round(1000 * s, 3) for s in old_s]}
    out = ROOT / "bench" / "results" / "events.json"
    out.write_text(json.dumps(results, indent=1))
    print("| events | ours, ms per event | old way, ms per event |\n|---|---|---|")
    for i, o in enumerate(results["ours_ms_per_event"]):
        old = results["old_ms_per_event"]
        print(f"| {i * BLOCK + 1}-{(i + 1) * BLOCK} | {o:.2f} | "
              f"{old[i]:.2f} |" if i < len(old) else f"| {i * BLOCK + 1}-{(i + 1) * BLOCK} "
              f"| {o:.2f} | - |")


if __name__ == "__main__":
    main()
