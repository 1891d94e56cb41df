"""Goodput under chaos: ours against Ray Train's TorchTrainer, side by side in one run.

The same GPT (workloads/gpt.py, 4 layers, 128 wide, sequence 128, global batch 16), DDP on 2
workers of one local Ray (`ray.init(num_cpus=4)`), a checkpoint every INTERVAL steps for both
(ours: `checkpoint.async_mode: thread`; Ray Train: `ray.train.report` with a `torch.save`d
checkpoint from rank 0, as its docs show). From outside, this script SIGKILLs rank 1's
process every T seconds of wall time (T = 30 and 60), as a preemption would, whatever the job
is doing at that moment.

Goodput = productive time / wall time. Wall time: from starting the job (Driver.run /
TorchTrainer.fit) to its return, measured here for both. Productive time: the compute time
(rank 0, from the start of a step to the end of its optimizer step) of the steps the final
model descends from; steps computed and then thrown away by a restore do not count, nor do
start-up, recovery, or checkpoint saves. Ours is read from the run's events
(orchestrator/goodput.py), Ray Train's from the per-step timeline its loop writes.

    python bench/goodput.py                       # T = 30 and 60, about 10 minutes here
    python bench/goodput.py --periods 60 --steps 600

Writes bench/results/goodput.json and prints the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as bench/recovery.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

import ray_train_baseline as baseline  # noqa: E402

GPT = {"seed": 0, "n_layer": 4, "n_embd": 128, "n_head": 4, "seq_len": 128,
       "batch_size": 16, "parallelism": "ddp"}
INTERVAL = 20
WORKERS = 2


class Killer(threading.Thread):
    """SIGKILLs the process `pid_of()` names every `period_s`, from outside the job."""

    def __init__(self, period_s: float, pid_of) -> None:
        super().__init__(daemon=True)
        self.period_s, self.pid_of = period_s, pid_of
        self.kills: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        started, last = time.monotonic(), None
        while not self.stop.wait(max(started + self.period_s * (len(self.kills) + 1)
                                     - time.monotonic(), 0)):
            while not self.stop.is_set():  # a replacement not started yet: wait for it
                pid = self.pid_of()
                if pid and pid != last:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    last = pid
                    self.kills.append(time.time())
                    break
                time.sleep(0.2)


def ours(root: Path, steps: int, period_s: float) -> dict:
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import JobConfig, from_dict
    from orchestrator.driver import Driver
    from orchestrator.events import has_event_log, read_events
    from orchestrator.goodput import breakdown
    from orchestrator.worker_group import RayWorkerGroup

    config = from_dict(JobConfig, {
        "run": {"name": f"goodput-{period_s:g}", "storage": str(root)},
        "workload": {"entrypoint": "workloads.gpt:train", "args": {**GPT, "steps": steps}},
        "scaling": {"num_workers": WORKERS},
        "checkpoint": {"interval_steps": INTERVAL, "async_mode": "thread"},
        "failure": {"max_restarts": 100, "backoff_initial_s": 0},
    })
    layout = RunLayout(Storage(config.run.storage_url), config.run.name)

    def rank1_pid():
        if not has_event_log(layout):
            return None
        started = [e for e in read_events(layout) if e["kind"] == "workers_started"]
        return started[-1]["workers"][1]["pid"] if started else None

    killer = Killer(period_s, rank1_pid)
    t0 = time.time()
    killer.start()
    result = Driver(config, RayWorkerGroup(config), layout).run()
    wall_s = time.time() - t0
    killer.stop.set()
    assert result.succeeded, result.message
    g = breakdown(read_events(layout))
    return {"system": "ours", "period_s": period_s, "wall_s": wall_s,
            "productive_s": g.productive_s, "goodput": g.productive_s / wall_s,
            "kills": len(killer.kills), "restarts": result.summary["restarts"],
            "lost_steps": g.lost_steps, "time_s": g.to_summary()["time_s"]}


def ray_train(root: Path, steps: int, period_s: float) -> dict:
    out = root / f"raytrain-{period_s:g}"
    trainer = baseline.make_trainer({**GPT, "steps": steps}, WORKERS, out,
                                    f"goodput-{period_s:g}", max_failures=100,
                                    interval=INTERVAL)

    def rank1_pid():
        workers = [w for w in baseline.read_jsonl(out / "workers.jsonl") if w["rank"] == 1]
        return workers[-1]["pid"] if workers else None

    killer = Killer(period_s, rank1_pid)
    t0 = time.time()
    killer.start()
    trainer.fit()
    wall_s = time.time() - t0
    killer.stop.set()
    kept: dict[int, float] = {}
    restarts = -1
    for t in baseline.read_jsonl(out / "timeline.jsonl"):
        if t["first"]:
            restarts += 1
            kept = {s: b for s, b in kept.items() if s <= t["resumed_from"]}
        kept[t["step"]] = t["busy_s"]
    assert len(kept) == steps, f"Ray Train finished {len(kept)} of {steps} steps"
    productive_s = sum(kept.values())
    return {"system": "ray_train", "period_s": period_s, "wall_s": wall_s,
            "productive_s": productive_s, "goodput": productive_s / wall_s,
            "kills": len(killer.kills), "restarts": restarts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=float, nargs="+", default=[30.0, 60.0])
    parser.add_argument("--steps", type=int, default=1500,
                        help="steps per run (about 2 minutes uninterrupted here)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "goodput.json"))
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for period_s in args.periods:
            for measure in (ours, ray_train):
                run = measure(Path(tmp), args.steps, period_s)
                print(json.dumps(run), flush=True)
                runs.append(run)
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"commit": commit, "steps": args.steps,
                                          "interval_steps": INTERVAL, "workers": WORKERS,
                                          "gpt": GPT, "runs": runs}, indent=1))
    print("\n| kill every | ours: goodput | Ray Train: goodput | ours: kills, restarts | "
          "Ray Train: kills, restarts |\n|---|---|---|---|---|")
    for period_s in args.periods:
        o, r = (next(x for x in runs if x["system"] == s and x["period_s"] == period_s)
                for s in ("ours", "ray_train"))
        print(f"| {period_s:g} s | {o['goodput']:.3f} | {r['goodput']:.3f} | "
              f"{o['kills']}, {o['restarts']} | {r['kills']}, {r['restarts']} |")


if __name__ == "__main__":
    main()
