"""What runs inside each worker actor: process-group setup and attempts of the workload.

The actor is threaded (two concurrent calls): `run` holds one thread for the whole attempt,
while the driver's `poll` is answered on the other -- from outside the training thread, so a
worker whose training is stuck still answers, and one that is stopped does not.

An actor outlives an attempt: after a failure elsewhere in the gang, the driver reuses it,
and `setup` tears its process group down and joins the new one.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import threading
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from orchestrator.chaos.inject import FaultInjector
from orchestrator.chaos.plan import Fault
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.memory import MemoryTier
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.storage_probe import check_shared_storage
from orchestrator.context import AttemptStopped, Reporter, StopMode, StopRequest, TrainContext
from orchestrator.messages import AttemptSpec, ErrorInfo, Rendezvous, WorkerInfo, WorkerOutcome, WorkerReport

_ABORT_TIMEOUT_S = 5.0
_SAVE_DRAIN_TIMEOUT_S = 10.0
"""How long a failed attempt waits for its background save: with a peer gone, the save's
collectives fail within about a second; a save that takes longer is abandoned (uncommitted)."""
_MEMORY_DRAIN_TIMEOUT_S = 2.0
"""How long a failed attempt waits for the memory tier's copy in flight (its copies already
complete are kept either way)."""


class TrainWorker:
    def __init__(self, preload: str = "") -> None:
        """`preload`: the workload's entrypoint, imported now so that a spare is warm."""
        # Lazy gloo connections: re-forming a group in long-lived processes otherwise fails
        # now and then in connectFullMesh (DESIGN.md). Set here, in the actor's own process,
        # before any group exists, rather than as a runtime_env: an actor with a runtime_env
        # of its own cannot take one of Ray's prestarted worker processes.
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
        if preload:
            try:
                _load_entrypoint(preload)
            except Exception:  # noqa: BLE001 -- run() reports it, with its traceback
                pass
        self._reporter = Reporter()
        self._stop = StopRequest()
        self._rdzv: Rendezvous | None = None
        self._ckpt_group: dist.ProcessGroup | None = None
        self._save_group: dist.ProcessGroup | None = None
        self._memory_group: dist.ProcessGroup | None = None
        self._memory = MemoryTier()
        """The memory tier's copies: kept by the actor across attempts, so that survivors of a
        failure still hold them when the gang restarts."""
        self._faults = FaultInjector([], rank=-1, layout=None)
        # A preemption notice (the cloud's SIGTERM) asks for a checkpoint now instead of
        # Ray's default of exiting at once. The actor's constructor runs on the main thread,
        # the only one allowed to install signal handlers.
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop.request(StopMode.NOW, "preemption notice: SIGTERM")

    def request_stop(self, mode: int, reason: str) -> None:
        """Ask the running attempt to end after a checkpoint (see StopMode)."""
        self._stop.request(StopMode(mode), reason)

    def inject(self, fault: Fault) -> None:
        """A fault for the running attempt, from the driver (chaos)."""
        self._faults.add(fault)

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
        """Join the gang's process group, leaving any earlier one first.

        Collective: every rank's setup must run at the same time. Each rendezvous uses a
        fresh port (a fresh TCPStore), so nothing of an earlier group can leak into it.
        """
        _destroy_process_group()
        _bind_gloo_to(_node_ip())
        if rdzv.backend == "nccl":
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU(s)
        timeout = timedelta(seconds=rdzv.timeout_s)
        dist.init_process_group(rdzv.backend, init_method=f"tcp://{rdzv.master_addr}:{rdzv.master_port}",
                                rank=rdzv.rank, world_size=rdzv.world_size, timeout=timeout)
        self._ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        # Background saves get a group of their own (see checkpoint/manager.py).
        self._save_group = dist.new_group(backend="gloo", timeout=timeout)
        # And so does the memory tier's buddy exchange, on its own thread.
        self._memory_group = dist.new_group(backend="gloo", timeout=timeout)
        self._rdzv = rdzv
        self._reporter = Reporter()
        if self._stop.mode is not StopMode.NOW:  # a notice of preemption stays in force
            self._stop = StopRequest()

    def run(self, spec: AttemptSpec) -> WorkerOutcome:
        """Run the workload to its end. Failures come back as data, never as exceptions."""
        rdzv = self._rdzv
        assert rdzv is not None, "setup() must run before run()"
        manager = None
        try:
            layout = RunLayout(Storage(spec.storage_url), spec.run_name)
            # Before anything is restored or saved: the driver and every rank must reach the
            # same storage (a local path on several nodes does not); the gang changes at
            # restarts.
            check_shared_storage(layout, rdzv.rank, rdzv.world_size, self._ckpt_group,
                                 spec.storage_probe)
            faults = self._faults = FaultInjector(spec.faults, rdzv.rank, layout, spec.attempt)
            manager = CheckpointManager(
                layout=layout, rank=rdzv.rank, world_size=rdzv.world_size,
                parallelism=spec.parallelism, group=self._ckpt_group,
                save_group=self._save_group, config=spec.checkpoint, faults=faults,
                emit=self._reporter.emit, host=rdzv.master_addr, timeout_s=rdzv.timeout_s,
                job_id=spec.job_id, fencing_token=spec.fencing_token)
            self._memory.begin_attempt(
                rank=rdzv.rank, world_size=rdzv.world_size, parallelism=spec.parallelism,
                group=self._ckpt_group, ring=self._memory_group,
                interval_steps=spec.checkpoint.memory_interval_steps, emit=self._reporter.emit)
            device = torch.device("cuda", 0) if rdzv.backend == "nccl" else torch.device("cpu")
            ctx = TrainContext(
                rank=rdzv.rank, world_size=rdzv.world_size, local_rank=rdzv.local_rank,
                device=device, args=spec.args, attempt=spec.attempt,
                checkpoint=spec.checkpoint, restore=spec.restore, checkpoints=manager,
                faults=faults, reporter=self._reporter, stop=self._stop, memory=self._memory)
            try:
                _load_entrypoint(spec.entrypoint)(ctx)
            except AttemptStopped:
                self._memory.end_attempt(timeout_s=_SAVE_DRAIN_TIMEOUT_S)
                manager.finish()
                raise
            self._memory.end_attempt(timeout_s=_SAVE_DRAIN_TIMEOUT_S)
            manager.finish()  # the job waits for the save in flight before it ends
        except AttemptStopped as e:
            return WorkerOutcome(rank=rdzv.rank, step=self._reporter.progress.step,
                                 stopped=str(e), got_notice=self._stop.mode is StopMode.NOW)
        # BaseException: DCP's CheckpointException derives from it, not from Exception.
        except BaseException as e:  # noqa: BLE001 -- reported to the driver as data
            error = ErrorInfo.from_exception(e)
            # Peers may be blocked in a collective with us, and they only notice when our
            # connections close -- which happens when the last reference to our process
            # groups goes. The traceback holds the workload's frames (its model holds the
            # group), so drop it first, then the groups.
            e.__traceback__ = None
            del e
            if manager is not None:
                # A save in flight finishes or fails with its peers before we restart.
                manager.close(timeout_s=_SAVE_DRAIN_TIMEOUT_S)
            # A copy in flight fails with its peers within a second or so; one stuck on a
            # hung peer is abandoned (begin_attempt) rather than waited for.
            self._memory.end_attempt(timeout_s=_MEMORY_DRAIN_TIMEOUT_S)
            ctx = manager = None  # noqa: F841 -- dropping references is the point
            self._ckpt_group = self._save_group = self._memory_group = None
            gc.collect()
            _destroy_process_group()
            return WorkerOutcome(rank=rdzv.rank, step=self._reporter.progress.step, error=error)
        return WorkerOutcome(rank=rdzv.rank, step=self._reporter.progress.step)

    def poll(self) -> WorkerReport:
        progress, durations, events, slowest = self._reporter.drain()
        rank = self._rdzv.rank if self._rdzv else -1
        return WorkerReport(rank=rank, step=progress.step,
                            metrics=progress.metrics, progress_seq=progress.seq,
                            step_durations=durations, events=events,
                            doing=progress.doing.value, slowest_s=slowest)


def _load_entrypoint(entrypoint: str):
    module, _, func = entrypoint.partition(":")
    return getattr(importlib.import_module(module), func)


def _destroy_process_group() -> None:
    """Leave the current process group, if any, without ever blocking for long: a group
    whose peers are gone can hang in its destructor, and then we would rather leak it."""
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- a broken group is what we are discarding
            pass
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    done.wait(_ABORT_TIMEOUT_S)


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
