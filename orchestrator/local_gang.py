"""Run a function on a gang of local processes joined by real gloo groups, without Ray:
for tests and benchmarks of the checkpoint layer.

Each rank gets the three groups a worker has: the default (training) group, the checkpoint
control group and the background-save group. `run_gang` returns each rank's return value.

Ranks are forked from multiprocessing's forkserver, which imports torch and the checkpoint
layer once (PRELOAD): a rank then starts in milliseconds, where a spawned one spent about
2.5 s of a 2-core machine importing them (the integration tests start over a hundred gangs).
The server is a fresh interpreter, not a fork of the caller: each rank is given the caller's
environment, working directory and sys.path as they are at the call, as a spawned one was.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import time
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

PRELOAD = ["__main__", "torch", "torch.distributed", "torch.distributed.checkpoint",
           "orchestrator.checkpoint.manager", "orchestrator.checkpoint.memory"]
"""Imported by the forkserver before it forks any rank ('__main__': a script's own module,
so that its functions can be a gang's target)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: Callable, args: tuple, out_dir: str,
           caller: tuple[dict[str, str], str, list[str]]) -> None:
    env, cwd, path = caller
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:] = path
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
    caller = ({**os.environ, "GLOO_SOCKET_IFNAME": "lo", **(env or {})}, os.getcwd(),
              list(sys.path))
    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server first starts
    context = mp.start_processes(_entry, args=(world, free_port(), target, args, out_dir,
                                               caller),
                                 nprocs=world, join=False, start_method="forkserver")
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
