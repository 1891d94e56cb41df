"""Run a function on a gang of local processes joined by real gloo groups, without Ray:
for tests and benchmarks of the checkpoint layer.

Each rank gets the three groups a worker has: the default (training) group, the checkpoint
control group and the background-save group. `run_gang` returns each rank's return value.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: Callable, args: tuple, out_dir: str,
           env: dict[str, str]) -> None:
    os.environ.update(env)
    import torch.distributed as dist

    timeout = timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)
    groups = (dist.new_group(backend="gloo", timeout=timeout),
              dist.new_group(backend="gloo", timeout=timeout))
    result = target(rank, world, groups, *args)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run_gang(target: Callable, world: int, *args: Any, out_dir: str, timeout_s: float = 240,
             env: dict[str, str] | None = None) -> list[Any]:
    env = {"GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    context = mp.start_processes(_entry, args=(world, free_port(), target, args, out_dir, env),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()  # our own children
            raise TimeoutError(f"the gang did not finish within {timeout_s:.0f} s")
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
