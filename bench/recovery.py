"""Recovery after failures: ours against Ray Train's TorchTrainer, side by side in one run.

Scenarios, each on the same multi-node local cluster (`ray.cluster_utils.Cluster`, head plus
three 4-CPU worker nodes; GCS health check 0.5 s x 2 for both systems), same GPT
(workloads/gpt.py), DDP, a checkpoint every 5 steps:

  kill    the last rank SIGKILLs itself 5 times per run (steps 8, 48, 88, ...: 3 steps after
          a checkpoint, far enough apart for a spare to warm up again); 2 and 4 workers;
          ours with a new process per lost rank (no spare, no standby), with the default
          standby (an idle warm process holding no resources) and with one spare, each
          with the memory tier `auto`; the standby and the spare also with the memory
          tier copying every step.
  hang    rank 1 is SIGSTOPped after step 10; ours with the default failure.hang_timeout_s
          (auto: 5 x the slowest step, at least 10 s), Ray Train with its worker health-check
          timeout set to the same 10 s (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S; its default
          is 600 s).
  node    the node hosting rank 1 is removed (raylet killed) after step 10; a fresh node joins.
  driver  the driver process is SIGKILLed after step 10 and started again at once.

Recovery time = the event (kill marker's mtime, or the moment the benchmark acted) -> the end
of the first training step after the restart. Steps lost = the step reached at the event -
the step the restart resumed from. Medians of 5.

    python bench/recovery.py                       # everything (about 15 minutes here)
    python bench/recovery.py --scenarios kill --workers 2

Writes bench/results/recovery.json and prints the markdown tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Ray reads these when it is imported. The baseline gets its health check tuned from the
# default 2 s to 0.2 s, as in DESIGN.md, so that it is not handicapped by a default.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# A hung worker: Ray Train's health check gives up on a worker after this (default 600 s);
# set to our own floor (failure.hang_min_s), the timeout ours arrives at on these steps.
os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "10")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

import ray_train_baseline as baseline  # noqa: E402

GPT = {"steps": 0, "seed": 0, "n_layer": 2, "n_embd": 64, "n_head": 4, "seq_len": 64,
       "batch_size": 8, "parallelism": "ddp"}
INTERVAL = 5
TRIALS = 5
RAY_TRAIN_HANG_WAIT_S = 120.0
KILL_SPACING = 40


def poll_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


# --- ours -----------------------------------------------------------------------------------


def our_config(root: Path, name: str, workers: int, steps: int, spares: int = 0,
               standbys: int = 1, **sections):
    from orchestrator.config import JobConfig, from_dict

    return from_dict(JobConfig, {
        "run": {"name": name, "storage": str(root)},
        "workload": {"entrypoint": "workloads.gpt:train", "args": {**GPT, "steps": steps}},
        "scaling": {"num_workers": workers, "spare_workers": spares,
                    "standby_workers": standbys,
                    **sections.pop("scaling", {})},
        "checkpoint": {"interval_steps": INTERVAL},
        # No back-off: the failures here are minutes apart in real life, seconds apart here.
        "failure": {"max_restarts": 10, "backoff_initial_s": 0, **sections.pop("failure", {})},
        **sections,
    })


class OurRun:
    """One of our jobs, its driver in a thread of this process."""

    def __init__(self, config) -> None:
        from orchestrator.checkpoint.layout import RunLayout
        from orchestrator.checkpoint.storage import Storage
        from orchestrator.driver import Driver
        from orchestrator.worker_group import RayWorkerGroup

        self.layout = RunLayout(Storage(config.run.storage_url), config.run.name)
        self.driver = Driver(config, RayWorkerGroup(config), self.layout)
        self.thread = threading.Thread(target=self._run)
        self.result = None
        self.thread.start()

    def _run(self) -> None:
        self.result = self.driver.run()

    def events(self, kind: str | None) -> list[dict]:
        """The run's events of `kind` (None: all), in order."""
        from orchestrator.events import read_events

        if not self.layout.storage.exists(*self.layout.events):
            return []
        return [e for e in read_events(self.layout) if kind is None or e["kind"] == kind]

    def reached(self, step: int) -> bool:
        return any(e["step"] >= step for e in self.events("checkpoint_committed"))

    def join(self) -> None:
        self.thread.join(timeout=600)
        assert self.result is not None and self.result.succeeded, self.result


def plan_kills(rank: int, steps: list[int]):
    from orchestrator.chaos import FaultPlan

    plan = FaultPlan()
    for step in steps:
        plan.kill_at(rank=rank, step=step)
    return plan


def ours_kill(root: Path, workers: int, spares: int, standbys: int,
              memory: int | str = "auto") -> list[dict]:
    from orchestrator.chaos.requests import read_marker

    steps = [8 + KILL_SPACING * i for i in range(TRIALS)]
    config = our_config(root, f"kill-{workers}-{spares}-{standbys}-{memory}", workers,
                        steps[-1] + 5, spares, standbys,
                        checkpoint={"interval_steps": INTERVAL,
                                    "memory_interval_steps": memory},
                        chaos=plan_kills(workers - 1, steps).config())
    run = OurRun(config)
    run.join()
    firsts = {e["attempt"]: e for e in run.events("first_step")}
    resumed = resumed_steps(run.events(None))
    samples = []
    for i, step in enumerate(steps):
        fired = read_marker(run.layout, f"kill-rank{workers - 1}-step{step}")["fired_at"]
        samples.append({"event_step": step, "resumed_from": resumed[i],
                        "recovery_s": firsts[i + 1]["step_end_time"] - fired})
    return samples


def resumed_steps(events: list[dict]) -> list[int]:
    """The step each restart resumed from: rank 0's first restore after it, from memory
    (`memory_restored`) or storage (`checkpoint_restored`, absent for step 0). The restart
    event's `from_step` is only the storage step it would fall back to."""
    out: list[int] = []
    waiting = False
    for e in events:
        if e["kind"] == "restart":
            if waiting:
                out.append(0)  # nothing restored: it started over
            waiting = True
        elif waiting and e["kind"] in ("memory_restored", "checkpoint_restored") \
                and e.get("rank", 0) == 0:
            out.append(int(e["step"]))
            waiting = False
    if waiting:
        out.append(0)
    return out


def ours_external(root: Path, scenario: str, cluster, trial: int) -> dict:
    """One trial of hang or node loss: act on rank 1 after step 10, measure the recovery."""
    strategy = "SPREAD" if scenario == "node" else "PACK"
    config = our_config(root, f"{scenario}-{trial}", 2, 40,
                        scaling={"placement_strategy": strategy})
    run = OurRun(config)
    poll_until(lambda: run.reached(10), 120, "step 10")
    worker = run.events("workers_started")[0]["workers"][1]
    t_event = act_on(scenario, cluster, pid=worker["pid"], node_id=worker["node_id"])
    run.join()
    first = [e for e in run.events("first_step") if e["attempt"] == 1][0]
    (failure,) = [e for e in run.events("failure") if e["rank"] == 1]
    return {"event_step": failure["step"], "resumed_from": run.events("restart")[0]["from_step"],
            "recovery_s": first["step_end_time"] - t_event, "kind": failure["failure_kind"]}


def ours_driver_loss(root: Path, address: str, trial: int) -> dict:
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.events import read_events

    name = f"driver-{trial}"
    layout = RunLayout(Storage(str(root)), name)
    cmd = [sys.executable, "-m", "orchestrator", "run", "--address", address,
           "--set", f"run.storage={root}", "--set", f"run.name={name}",
           "--set", f"workload.args={json.dumps({**GPT, 'steps': 60})}",
           "--set", f"checkpoint.interval_steps={INTERVAL}"]
    events = lambda kind: ([e for e in read_events(layout) if e["kind"] == kind]
                           if layout.storage.exists(*layout.events) else [])
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll_until(lambda: any(e["step"] >= 10 for e in events("checkpoint_committed")), 120, "step 10")
    reached = max(e["step"] for e in events("progress") + events("checkpoint_committed"))
    first.send_signal(signal.SIGKILL)
    t_event = time.time()
    first.wait()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    (restored,) = [e for e in events("checkpoint_restored") if e["time"] > t_event]
    step_end = [e for e in events("first_step") if e["time"] > t_event][0]["step_end_time"]
    return {"event_step": reached, "resumed_from": restored["step"],
            "recovery_s": step_end - t_event}


# --- Ray Train ------------------------------------------------------------------------------


def ray_train_kill(root: Path, workers: int) -> list[dict]:
    steps = [8 + KILL_SPACING * i for i in range(TRIALS)]
    trainer = baseline.make_trainer({**GPT, "steps": steps[-1] + 5}, workers, root,
                                    f"kill-{workers}", TRIALS, kill_steps=steps)
    trainer.fit()
    starts = [t for t in baseline.read_jsonl(root / "timeline.jsonl") if t["first"]]
    return [{"event_step": step, "resumed_from": starts[i + 1]["resumed_from"],
             "recovery_s": starts[i + 1]["time"] - (root / f"kill-step{step}").stat().st_mtime}
            for i, step in enumerate(steps)]


def ray_train_external(root: Path, scenario: str, cluster, trial: int) -> dict:
    strategy = "SPREAD" if scenario == "node" else "PACK"
    trainer = baseline.make_trainer({**GPT, "steps": 40}, 2, root, f"{scenario}-{trial}", 3,
                                    strategy=strategy)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (trainer.fit(), done.set()))
    thread.start()
    timeline = root / "timeline.jsonl"
    poll_until(lambda: any(t["step"] >= 10 for t in baseline.read_jsonl(timeline)), 120, "step 10")
    worker = [w for w in baseline.read_jsonl(root / "workers.jsonl") if w["rank"] == 1][-1]
    reached = baseline.read_jsonl(timeline)[-1]["step"]
    t_event = act_on(scenario, cluster, pid=worker["pid"], node_id=worker["node_id"])
    deadline = RAY_TRAIN_HANG_WAIT_S if scenario == "hang" else 600
    try:
        start = poll_until(lambda: [t for t in baseline.read_jsonl(timeline)
                                    if t["first"] and t["time"] > t_event], deadline, "a restart")[0]
        sample = {"event_step": reached, "resumed_from": start["resumed_from"],
                  "recovery_s": start["time"] - t_event}
    except TimeoutError:
        sample = {"event_step": reached, "resumed_from": None, "recovery_s": None,
                  "note": f"not detected within {deadline:.0f} s"}
        os.kill(worker["pid"], signal.SIGKILL)  # our own stopped worker: let the run end
    thread.join(timeout=600)
    return sample


def ray_train_driver_loss(root: Path, address: str, trial: int) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "ray_train_baseline.py"), "--address", address,
           "--out", str(root), "--name", f"driver-{trial}", "--gpt",
           json.dumps({**GPT, "steps": 60})]
    timeline = root / "timeline.jsonl"
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll_until(lambda: any(t["step"] >= 10 for t in baseline.read_jsonl(timeline)), 180, "step 10")
    reached = baseline.read_jsonl(timeline)[-1]["step"]
    first.send_signal(signal.SIGKILL)
    t_event = time.time()
    first.wait()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    start = [t for t in baseline.read_jsonl(timeline) if t["first"] and t["time"] > t_event][0]
    return {"event_step": reached, "resumed_from": start["resumed_from"],
            "recovery_s": start["time"] - t_event}


# --- acting on the cluster ------------------------------------------------------------------


def act_on(scenario: str, cluster, pid: int, node_id: str) -> float:
    if scenario == "hang":
        os.kill(pid, signal.SIGSTOP)
        return time.time()
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    t = time.time()
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=4)  # the replacement an autoscaler would bring, for later trials
    return t


# --- the run --------------------------------------------------------------------------------


def summarize(samples: list[dict]) -> dict:
    times = [s["recovery_s"] for s in samples if s["recovery_s"] is not None]
    lost = [s["event_step"] - s["resumed_from"] for s in samples if s["resumed_from"] is not None]
    return {
        "recovery_s_median": round(statistics.median(times), 3) if times else None,
        "recovery_s_all": [None if s["recovery_s"] is None else round(s["recovery_s"], 3)
                           for s in samples],
        "steps_lost_median": statistics.median(lost) if lost else None,
        "steps_lost_max": max(lost) if lost else None,
        "notes": sorted({s["note"] for s in samples if "note" in s}),
        "samples": samples,
    }


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                           "health_check_timeout_ms": 500},
    })
    for _ in range(3):
        cluster.add_node(num_cpus=4)
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["kill", "hang", "node", "driver"])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--trials", type=int, default=5, help="samples per measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    args = parser.parse_args()
    global TRIALS
    TRIALS = args.trials

    import torch

    cluster = start_cluster()
    ray.init(address=cluster.address, log_to_driver=False)
    # The baseline's training function travels by value: the workers cannot import bench/.
    ray.cloudpickle.register_pickle_by_value(baseline)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results: dict = {"commit": commit, "trials": TRIALS,
                     "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "ray": ray.__version__}, "runs": {}}

    def record(key: str, samples: list[dict], t0: float) -> None:
        results["runs"][key] = summary = summarize(samples)
        print(f"[recovery] {key}: median {summary['recovery_s_median']} s "
              f"{summary['recovery_s_all']}, steps lost {summary['steps_lost_median']} "
              f"{' '.join(summary['notes'])} ({time.time() - t0:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "kill" in args.scenarios:
            for workers in args.workers:
                for label, spares, standbys, memory in (
                        ("new_process", 0, 0, "auto"), ("standby", 0, 1, "auto"),
                        ("standby_memory_every_step", 0, 1, 1), ("spare", 1, 0, "auto"),
                        ("spare_memory_every_step", 1, 0, 1)):
                    t0 = time.time()
                    record(f"kill/{workers}/ours_{label}",
                           ours_kill(tmp / f"ours-kill-{workers}-{label}", workers, spares,
                                     standbys, memory), t0)
                t0 = time.time()
                record(f"kill/{workers}/ray_train",
                       ray_train_kill(tmp / f"rt-kill-{workers}", workers), t0)
        for scenario in ("hang", "node"):
            if scenario not in args.scenarios:
                continue
            t0 = time.time()
            record(f"{scenario}/2/ours", [ours_external(tmp / f"ours-{scenario}", scenario,
                                                        cluster, i) for i in range(TRIALS)], t0)
            t0 = time.time()
            record(f"{scenario}/2/ray_train", [ray_train_external(
                tmp / f"rt-{scenario}-{i}", scenario, cluster, i) for i in range(TRIALS)], t0)
        if "driver" in args.scenarios:
            t0 = time.time()
            record("driver/2/ours", [ours_driver_loss(tmp / "ours-driver", cluster.address, i)
                                     for i in range(TRIALS)], t0)
            t0 = time.time()
            record("driver/2/ray_train", [ray_train_driver_loss(tmp / f"rt-driver-{i}",
                                                                cluster.address, i)
                                          for i in range(TRIALS)], t0)
    ray.shutdown()
    cluster.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results["runs"])


def print_tables(runs: dict) -> None:
    print("\n| scenario | workers | ours: recovery s (median) | Ray Train: recovery s (median) | "
          "ratio ours / Ray Train | steps lost, ours | steps lost, Ray Train |")
    print("|---|---|---|---|---|---|---|")
    for key, ours in runs.items():
        scenario, workers, system = key.split("/")
        if system == "ray_train":
            continue
        base = runs.get(f"{scenario}/{workers}/ray_train", {})
        label = scenario + (f" ({system.removeprefix('ours_')})" if system != "ours" else "")
        o, b = ours["recovery_s_median"], base.get("recovery_s_median")
        ratio = f"{o / b:.2f}" if o and b else "n/a"
        print(f"| {label} | {workers} | {o} | {b if b is not None else ', '.join(base.get('notes', [])) or 'n/a'} "
              f"| {ratio} | {ours['steps_lost_median']} | {base.get('steps_lost_median')} |")


if __name__ == "__main__":
    main()
