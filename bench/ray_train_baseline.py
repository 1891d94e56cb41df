"""The baseline: the same GPT, data and schedule as workloads/gpt.py, trained the Ray Train way
(Ray Train V2 `TorchTrainer`, DDP through `prepare_model`, checkpoints by `ray.train.report`).

Rank 0 appends one line per step to `timeline.jsonl` (step, time, whether it is the first step
of a (re)start, and the step it resumed from); every rank writes its pid and node once per
start, so a benchmark can stop, kill or take away the process or node of a rank.

Run on its own (the driver-loss and user-path benchmarks) as
    python bench/ray_train_baseline.py [--address ADDR] --out DIR --name NAME --gpt JSON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
from pathlib import Path

INTERVAL = 5


def train_loop(config: dict) -> None:
    import time

    import ray.train
    import torch
    from ray.train import Checkpoint

    from workloads.common import seed_everything, warmup_cosine
    from workloads.data import token_batch
    from workloads.gpt import GPT, GPTArgs

    a = GPTArgs(**config["gpt"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(config["out"])
    with open(out / "workers.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(),
                            "node_id": ray.get_runtime_context().get_node_id()}) + "\n")
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
    interval = config.get("interval", INTERVAL)
    for step in range(start + 1, a.steps + 1):
        began = time.time()
        x, y = token_batch(a.seed, position, a.batch_size, rank, world, a.seq_len, a.vocab_size)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        position += a.batch_size
        if rank == 0:
            now = time.time()
            with open(out / "timeline.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "time": now, "first": step == start + 1,
                                    "resumed_from": start, "busy_s": now - began}) + "\n")
        marker = out / f"kill-step{step}"
        if rank == world - 1 and step in config.get("kill_steps", []) and not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        if step % interval == 0 or step == a.steps:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(),
                                "step": step, "data_position": position}, Path(d) / "state.pt")
                ray.train.report({"step": step, "loss": loss.item()},
                                 checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)


def make_trainer(gpt_args: dict, workers: int, out: Path, name: str, max_failures: int,
                 kill_steps: list[int] = (), strategy: str = "PACK", interval: int = INTERVAL):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out.mkdir(parents=True, exist_ok=True)
    return TorchTrainer(
        train_loop,
        train_loop_config={"gpt": gpt_args, "kill_steps": list(kill_steps), "out": str(out),
                           "interval": interval},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     placement_strategy=strategy),
        run_config=RunConfig(name=name, storage_path=str(out / "storage"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )


def read_jsonl(path: Path) -> list[dict]:
    """The records of a file another process appends to (a last line still being written is
    left for the next read)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", help="a Ray cluster to join (default: an embedded one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--gpt", required=True, help="GPT args as JSON")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-failures", type=int, default=3)
    args = parser.parse_args()
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    make_trainer(json.loads(args.gpt), args.workers, Path(args.out), args.name,
                 args.max_failures).fit()


if __name__ == "__main__":
    main()
