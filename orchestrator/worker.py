"""What runs inside each worker actor: process-group setup and one attempt of the workload.

The actor is threaded (two concurrent calls): `run` holds one thread for the whole attempt,
while the driver's `poll` is answered on the other.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from orchestrator.chaos import FaultInjector
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.storage import Storage
from orchestrator.context import Reporter, TrainContext
from orchestrator.messages import AttemptSpec, ErrorInfo, Rendezvous, WorkerInfo, WorkerOutcome, WorkerReport


class TrainWorker:
    def __init__(self) -> None:
        self._reporter = Reporter()
        self._rdzv: Rendezvous | None = None
        self._ckpt_group: dist.ProcessGroup | None = None

    def info(self) -> WorkerInfo:
        import ray

        ctx = ray.get_runtime_context()
        return WorkerInfo(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                          pid=os.getpid(), gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()))

    def free_port(self) -> int:
        """A port free on this worker's node, for rank 0's rendezvous store."""
        import socket

        with socket.socket() as s:
            s.bind((_node_ip(), 0))
            return s.getsockname()[1]

    def setup(self, rdzv: Rendezvous) -> None:
        """Join the gang's process group. Collective: every rank's setup must run at once."""
        _bind_gloo_to(_node_ip())
        if rdzv.backend == "nccl":
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU(s)
        timeout = timedelta(seconds=rdzv.timeout_s)
        dist.init_process_group(rdzv.backend, init_method=f"tcp://{rdzv.master_addr}:{rdzv.master_port}",
                                rank=rdzv.rank, world_size=rdzv.world_size, timeout=timeout)
        self._ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        self._rdzv = rdzv

    def run(self, spec: AttemptSpec) -> WorkerOutcome:
        """Run the workload to its end. Failures come back as data, never as exceptions."""
        rdzv = self._rdzv
        assert rdzv is not None, "setup() must run before run()"
        try:
            layout = RunLayout(Storage(spec.storage_url), spec.run_name)
            faults = FaultInjector(spec.faults, rdzv.rank, layout)
            manager = CheckpointManager(
                layout=layout, rank=rdzv.rank, world_size=rdzv.world_size,
                parallelism=spec.parallelism, group=self._ckpt_group, faults=faults,
                emit=self._reporter.emit)
            device = torch.device("cuda", 0) if rdzv.backend == "nccl" else torch.device("cpu")
            ctx = TrainContext(
                rank=rdzv.rank, world_size=rdzv.world_size, local_rank=rdzv.local_rank,
                device=device, args=spec.args, attempt=spec.attempt,
                checkpoint_interval_steps=spec.checkpoint_interval_steps,
                restore_candidates=spec.restore_candidates, checkpoints=manager,
                faults=faults, reporter=self._reporter)
            _load_entrypoint(spec.entrypoint)(ctx)
        # BaseException: DCP's CheckpointException derives from it, not from Exception.
        except BaseException as e:  # noqa: BLE001 -- reported to the driver as data
            return WorkerOutcome(rank=rdzv.rank, step=self._reporter.progress.step,
                                 error=ErrorInfo.from_exception(e))
        return WorkerOutcome(rank=rdzv.rank, step=self._reporter.progress.step)

    def poll(self) -> WorkerReport:
        progress, durations, events = self._reporter.drain()
        rank = self._rdzv.rank if self._rdzv else -1
        return WorkerReport(rank=rank, step=progress.step, step_time=progress.time,
                            metrics=progress.metrics, step_durations=durations, events=events)


def _load_entrypoint(entrypoint: str):
    module, _, func = entrypoint.partition(":")
    return getattr(importlib.import_module(module), func)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _bind_gloo_to(address: str) -> None:
    """Make gloo listen on the interface that carries `address`.

    Without this, gloo resolves the hostname and may bind the machine's external address
    even when the whole cluster runs on loopback.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return
