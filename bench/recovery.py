"""Recovery after a SIGKILLed worker: ours against Ray Train's TorchTrainer, side by side.

Both systems train the same GPT (workloads/gpt.py) with DDP on the same local Ray, checkpoint
every 5 steps, and lose one worker process to SIGKILL at steps 8, 18, 28, ... (3 steps after
a checkpoint). The process kills itself after writing a marker file; its mtime is the kill
time. Recovery time = kill -> the end of the first training step after the restart. Steps
lost = kill step - the step the restart resumed from.

    python bench/recovery.py --workers 2 4 --kills 5

Writes bench/results/recovery.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Ray reads these when it is imported. The baseline gets its health check tuned from the
# default 2 s to 0.2 s, as measured in DESIGN.md, so that it is not handicapped by a default.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT_ARGS = {"steps": 0, "seed": 0, "n_layer": 2, "n_embd": 64, "n_head": 4, "seq_len": 64,
            "batch_size": 8, "parallelism": "ddp"}
INTERVAL = 5


def kill_steps(kills: int) -> list[int]:
    return [8 + 10 * i for i in range(kills)]


# --- ours -----------------------------------------------------------------------------------


def run_ours(workers: int, kills: int, root: Path) -> list[dict]:
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import JobConfig, from_dict
    from orchestrator.driver import Driver
    from orchestrator.events import read_events
    from orchestrator.worker_group import RayWorkerGroup

    steps = kill_steps(kills)
    config = from_dict(JobConfig, {
        "run": {"name": f"ours-{workers}", "storage": str(root)},
        "workload": {"entrypoint": "workloads.gpt:train",
                     "args": {**GPT_ARGS, "steps": steps[-1] + 5}},
        "scaling": {"num_workers": workers},
        "checkpoint": {"interval_steps": INTERVAL},
        "failure": {"max_restarts": kills},
        "chaos": {"kill": [{"rank": workers - 1, "step": s} for s in steps]},
    })
    layout = RunLayout(Storage(str(root)), config.run.name)
    result = Driver(config, RayWorkerGroup(config), layout).run()
    assert result.succeeded, result.message
    events = read_events(layout)
    firsts = {e["attempt"]: e for e in events if e["kind"] == "first_step"}
    restores = [e for e in events if e["kind"] == "restart"]
    samples = []
    for i, step in enumerate(steps):
        marker = Path(layout.storage.path(*layout.chaos, f"kill-rank{workers - 1}-step{step}"))
        first = firsts[i + 1]
        samples.append({"kill_step": step, "resumed_from": restores[i]["from_step"],
                        "recovery_s": first["step_end_time"] - marker.stat().st_mtime})
    return samples


# --- Ray Train baseline ---------------------------------------------------------------------


def ray_train_loop(config: dict) -> None:
    """The same model, data and schedule as workloads/gpt.py, written the Ray Train way."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from workloads.common import seed_everything, warmup_cosine
    from workloads.data import token_batch
    from workloads.gpt import GPT, GPTArgs

    a = GPTArgs(**config["gpt"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(a.seed)
    model = ray.train.torch.prepare_model(GPT(a))
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, a.steps)
    start, position = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, position = state["step"], state["data_position"]
    timeline = Path(config["timeline"])
    first = True
    for step in range(start + 1, a.steps + 1):
        x, y = token_batch(a.seed, position, a.batch_size, rank, world, a.seq_len, a.vocab_size)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        position += a.batch_size
        if first and rank == 0:
            with open(timeline, "a") as f:
                f.write(json.dumps({"resumed_from": start, "step_end_time": time.time()}) + "\n")
        first = False
        marker = timeline.parent / f"kill-step{step}"
        if rank == world - 1 and step in config["kill_steps"] and not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        if step % INTERVAL == 0 or step == a.steps:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(),
                                "step": step, "data_position": position}, Path(d) / "state.pt")
                ray.train.report({"step": step, "loss": loss.item()},
                                 checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)


def run_ray_train(workers: int, kills: int, root: Path) -> list[dict]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    steps = kill_steps(kills)
    root.mkdir(parents=True, exist_ok=True)
    timeline = root / "timeline.jsonl"
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"gpt": {**GPT_ARGS, "steps": steps[-1] + 5}, "kill_steps": steps,
                           "timeline": str(timeline)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"raytrain-{workers}", storage_path=str(root / "storage"),
                             failure_config=FailureConfig(max_failures=kills)),
    )
    trainer.fit()
    firsts = [json.loads(line) for line in timeline.read_text().splitlines()]
    samples = []
    for i, step in enumerate(steps):
        first = firsts[i + 1]  # firsts[0] is the fresh start
        samples.append({"kill_step": step, "resumed_from": first["resumed_from"],
                        "recovery_s": first["step_end_time"]
                        - (root / f"kill-step{step}").stat().st_mtime})
    return samples


# --- the run --------------------------------------------------------------------------------


def summarize(samples: list[dict]) -> dict:
    return {
        "recovery_s_median": round(statistics.median(s["recovery_s"] for s in samples), 3),
        "recovery_s_all": [round(s["recovery_s"], 3) for s in samples],
        "steps_lost_median": statistics.median(s["kill_step"] - s["resumed_from"] for s in samples),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--kills", type=int, default=5, help="kills per run (= samples)")
    parser.add_argument("--systems", nargs="+", default=["ours", "ray_train"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    args = parser.parse_args()

    import ray
    import torch

    ray.init(num_cpus=max(args.workers) * 2, include_dashboard=False, log_to_driver=False)
    runners = {"ours": run_ours, "ray_train": run_ray_train}
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "ray": ray.__version__}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for system in args.systems:
                t0 = time.time()
                print(f"[recovery] {system}, {workers} workers, {args.kills} kills ...", flush=True)
                samples = runners[system](workers, args.kills, Path(tmp) / f"{system}-{workers}")
                summary = summarize(samples)
                results["runs"][f"{system}/{workers}"] = summary
                print(f"[recovery] {system}/{workers}: median {summary['recovery_s_median']} s "
                      f"{summary['recovery_s_all']}, steps lost {summary['steps_lost_median']} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| workers | ours: recovery s (median) | Ray Train: recovery s (median) | ratio "
          "ours/Ray Train | steps lost ours | steps lost Ray Train |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        ours = results["runs"].get(f"ours/{workers}")
        base = results["runs"].get(f"ray_train/{workers}")
        if ours and base:
            print(f"| {workers} | {ours['recovery_s_median']} | {base['recovery_s_median']} | "
                  f"{ours['recovery_s_median'] / base['recovery_s_median']:.2f} | "
                  f"{ours['steps_lost_median']} | {base['steps_lost_median']} |")


if __name__ == "__main__":
    main()
