"""Recovery the way users meet it: the job as a subprocess on its own embedded Ray, a worker
SIGKILLed from outside at moments the job did not choose, the time read from the run's own
records. Ours (`orchestrator run`) and Ray Train (`bench/ray_train_baseline.py`, Ray Train
V2's TorchTrainer on an embedded Ray) side by side, the same GPT (workloads/gpt.py), 2 workers,
a checkpoint every 5 steps, Ray Train's health check tuned to 0.2 s (its default is 2 s).

Each run gets KILLS kills of rank 1's current process. The next kill comes a random time
(seeded, 6 to 10 s) after the previous recovery's first step, so it lands anywhere in a step,
a checkpoint save or an all-reduce -- and late enough for a standby or spare started after the
previous recovery to have warmed up (in real life failures are minutes apart). Recovery = the kill -> the end of the first training
step after it (ours: the `first_step` event; Ray Train: its timeline's first step of the
restart). Steps lost = the step reached at the kill - the step the restart resumed from.

Configurations of ours: the default (one standby process that holds no resources, no spare,
the memory tier at its `auto` pace), the memory tier at every step and off, no standby
(`scaling.standby_workers=0`, a new process per lost rank) and one spare
(`scaling.spare_workers=1`, holding a worker's resources).

    python bench/user_recovery.py            # about 15 minutes here

Writes bench/results/user_recovery.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from ray_train_baseline import read_jsonl  # noqa: E402

GPT = {"steps": 0, "seed": 0, "n_layer": 2, "n_embd": 64, "n_head": 4, "seq_len": 64,
       "batch_size": 8, "parallelism": "ddp"}
INTERVAL = 5
KILLS = 4
GAP_S = (6.0, 10.0)
STEPS = 1800
"""Enough for the kills at about 28 steps/s (ours here), a minute more for the rest."""
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
ENV.pop("RAY_ADDRESS", None)


def poll_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


class Ours:
    """`orchestrator run` on its embedded Ray; what we read is its events.jsonl."""

    def __init__(self, root: Path, name: str, overrides: list[str]) -> None:
        from orchestrator.checkpoint.layout import RunLayout
        from orchestrator.checkpoint.storage import Storage

        self.layout = RunLayout(Storage(str(root)), name)
        cmd = [sys.executable, "-m", "orchestrator", "run", "--set", f"run.storage={root}",
               "--set", f"run.name={name}", "--set", "workload.entrypoint=workloads.gpt:train",
               "--set", f"workload.args={json.dumps({**GPT, 'steps': STEPS})}",
               "--set", f"checkpoint.interval_steps={INTERVAL}",
               "--set", "failure.max_restarts=10", "--set", "failure.backoff_initial_s=0"]
        for o in overrides:
            cmd += ["--set", o]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def _events(self, kind: str | None) -> list[dict]:
        """The run's events of `kind` (None: all), in order."""
        from orchestrator.events import read_events

        if not self.layout.storage.exists(*self.layout.events):
            return []
        try:
            return [e for e in read_events(self.layout) if kind is None or e["kind"] == kind]
        except Exception:  # noqa: BLE001 -- a line being appended; read again
            return []

    def rank1_pid(self, attempt: int) -> int:
        started = [e for e in self._events("workers_started") if e["attempt"] == attempt]
        return started[0]["workers"][1]["pid"] if started else 0

    def first_step_end(self, attempt: int) -> float | None:
        firsts = [e for e in self._events("first_step") if e["attempt"] == attempt]
        return firsts[0]["step_end_time"] if firsts else None

    def resumed_from(self, attempt: int) -> int:
        """Rank 0's restore after the restart of `attempt`: from memory or from storage (the
        restart's own `from_step` is only the storage step it would fall back to)."""
        after = False
        for e in self._events(None):
            if e["kind"] == "restart":
                after = e["attempt"] == attempt
            elif after and e["kind"] in ("memory_restored", "checkpoint_restored") \
                    and e.get("rank", 0) == 0:
                return int(e["step"])
        return 0  # nothing restored: it started over

    def reached(self, attempt: int, killed_at: float) -> int:
        """Where the gang was when rank 1 died, as the driver recorded it (the progress
        events in the file lag behind)."""
        return [e for e in self._events("failure") if e["attempt"] == attempt][0]["step"]


class RayTrain:
    """The baseline script on its embedded Ray; what we read is its timeline and workers."""

    def __init__(self, root: Path, name: str) -> None:
        self.out = root
        cmd = [sys.executable, str(ROOT / "bench" / "ray_train_baseline.py"), "--out", str(root),
               "--name", name, "--gpt", json.dumps({**GPT, "steps": STEPS}),
               "--max-failures", str(KILLS + 2)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def _starts(self) -> list[dict]:
        return [t for t in read_jsonl(self.out / "timeline.jsonl") if t["first"]]

    def rank1_pid(self, attempt: int) -> int:
        workers = [w for w in read_jsonl(self.out / "workers.jsonl") if w["rank"] == 1]
        return workers[attempt]["pid"] if len(workers) > attempt else 0

    def first_step_end(self, attempt: int) -> float | None:
        starts = self._starts()
        return starts[attempt]["time"] if len(starts) > attempt else None

    def resumed_from(self, attempt: int) -> int:
        return self._starts()[attempt]["resumed_from"]

    def reached(self, attempt: int, killed_at: float) -> int:
        return max(t["step"] for t in read_jsonl(self.out / "timeline.jsonl")
                   if t["time"] <= killed_at)


def measure(job, rng: random.Random) -> list[dict]:
    samples = []
    poll_until(lambda: job.first_step_end(0), 300, "the first step")
    for attempt in range(KILLS):
        time.sleep(rng.uniform(*GAP_S))
        pid = poll_until(lambda: job.rank1_pid(attempt), 60, "rank 1's process")
        os.kill(pid, signal.SIGKILL)  # the job's own worker, which this benchmark started
        killed_at = time.time()
        end = poll_until(lambda: job.first_step_end(attempt + 1), 300, "the recovery")
        samples.append({"killed_at_step": job.reached(attempt, killed_at),
                        "resumed_from": job.resumed_from(attempt + 1),
                        "recovery_s": round(end - killed_at, 3)})
        print(f"  kill {attempt + 1}: {samples[-1]}", flush=True)
    _, err = job.proc.communicate(timeout=600)
    assert job.proc.returncode == 0, err[-3000:]
    return samples


def summarize(samples: list[dict]) -> dict:
    times = [s["recovery_s"] for s in samples]
    lost = [s["killed_at_step"] - s["resumed_from"] for s in samples]
    return {"recovery_s_median": round(statistics.median(times), 3),
            "recovery_s_min": min(times), "recovery_s_max": max(times),
            "steps_lost_median": statistics.median(lost), "samples": samples}


CONFIGS = {
    "ours (default: 1 standby, no spare, memory tier auto)": [],
    "ours, memory tier every step": ["checkpoint.memory_interval_steps=1"],
    "ours, memory tier off": ["checkpoint.memory_interval_steps=0"],
    "ours, no standby, no spare": ["scaling.standby_workers=0"],
    "ours, 1 spare": ["scaling.spare_workers=1", "scaling.resources_per_worker={CPU: 0.5}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "user_recovery.json"))
    args = parser.parse_args()
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                             "ray": ray.__version__},
               "setup": {"gpt": GPT, "steps": STEPS, "workers": 2, "interval_steps": INTERVAL,
                         "kills": KILLS, "gap_s": GAP_S, "seed": args.seed},
               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(list(CONFIGS.items()) + [("ray_train", None)]):
            print(f"[user_recovery] {label}", flush=True)
            root = Path(tmp) / f"run{i}"
            root.mkdir()
            job = RayTrain(root, "rt") if overrides is None else Ours(root, "ours", overrides)
            rng = random.Random(args.seed)  # the same gaps for every configuration
            results["runs"][label] = summarize(measure(job, rng))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| configuration | recovery median (min-max) | steps lost median |\n|---|---|---|")
    for label, r in results["runs"].items():
        print(f"| {label} | {r['recovery_s_median']:.2f} s ({r['recovery_s_min']:.2f}-"
              f"{r['recovery_s_max']:.2f}) | {r['steps_lost_median']:g} |")


if __name__ == "__main__":
    main()
