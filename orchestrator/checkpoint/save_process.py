"""`async_mode: process`: each worker's saves are written by a child process of its own.

The children form a gloo group of their own (rank 0's child hosts its store), so DCP's
planning collectives run among them, never on the training or checkpoint groups. A snapshot
reaches the child as shared-memory tensors (only handles cross the pipe); the child rebuilds
DTensors on its own 1-D mesh, writes with the hashing writer, and answers with the checksums
of the files it wrote, or with the error.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from orchestrator.checkpoint.manifest import FileEntry

START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SaveRequest:
    state: dict[str, Any]
    storage_url: str
    run_name: str
    step: int
    data_dir: str


@dataclass(frozen=True)
class SaveReply:
    written: dict[str, FileEntry]
    error: str = ""


class SaveProcess:
    """The parent's handle on one worker's writer process. Start it collectively: `start`
    takes `share_port`, which must hand rank 0's store port to every rank (a broadcast)."""

    def __init__(self, *, rank: int, world_size: int, host: str, timeout_s: float) -> None:
        self._rank, self._world, self._host, self._timeout_s = rank, world_size, host, timeout_s
        self._proc: Any = None
        self._conn: Any = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self, share_port: Callable[[int], int]) -> None:
        # spawn: a fork of a process that runs gloo and Ray threads is not safe.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name=f"ckpt-writer-{self._rank}",
                                 args=(child, self._rank, self._world, self._host,
                                       self._timeout_s), daemon=True)
        self._proc.start()
        child.close()
        port = self._receive(START_TIMEOUT_S) if self._rank == 0 else 0
        port = share_port(port)
        self._conn.send(port)
        ready = self._receive(START_TIMEOUT_S)
        if ready != "ready":
            raise RuntimeError(f"checkpoint writer process failed to start: {ready}")

    def save(self, request: SaveRequest) -> SaveReply:
        self._conn.send(request)
        reply = self._receive(None)
        assert isinstance(reply, SaveReply), reply
        return reply

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = None

    def _receive(self, timeout: float | None) -> Any:
        if timeout is not None and not self._conn.poll(timeout):
            raise RuntimeError(f"checkpoint writer process did not answer in {timeout:.0f}s")
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"checkpoint writer process died "
                               f"(exit code {self._proc.exitcode})") from None


def _die_with_parent() -> None:
    """Exit as soon as the parent (the worker) is gone. A worker killed mid-save must not leave
    a writer behind that goes on writing into a folder the next driver collects.
    (PR_SET_PDEATHSIG would fire when the parent *thread* that started us ends, not the
    process, so a watcher thread checks whether we were reparented.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_main(conn: Any, rank: int, world: int, host: str, timeout_s: float) -> None:
    import torch.distributed as dist

    _die_with_parent()
    try:
        store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=START_TIMEOUT_S)) if rank == 0 else None
        if store is not None:
            conn.send(store.port)
        port = conn.recv()
        if store is None:
            store = dist.TCPStore(host, port, world, is_master=False,
                                  timeout=timedelta(seconds=START_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        # Imported before saying ready, so that the first save does not pay for them.
        import torch.distributed.checkpoint  # noqa: F401
        import torch.distributed.tensor  # noqa: F401

        import orchestrator.checkpoint.writer  # noqa: F401
        conn.send("ready")
    except BaseException as e:  # noqa: BLE001 -- reported to the parent
        conn.send(f"{type(e).__name__}: {e}")
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the parent is gone
        if request is None:
            dist.destroy_process_group()
            return
        conn.send(_write(request, world))


def _write(request: SaveRequest, world: int) -> SaveReply:
    import torch.distributed.checkpoint as dcp

    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.checkpoint.writer import hashing_writer

    try:
        state = _rebuild(request.state, world)
        layout = RunLayout(Storage(request.storage_url), request.run_name)
        writer = hashing_writer(layout, request.step, request.data_dir)
        dcp.save(state, storage_writer=writer)
        return SaveReply(written=dict(writer.fs.written))
    except BaseException as e:  # noqa: BLE001 -- CheckpointException is a BaseException
        from orchestrator.checkpoint.describe import describe_error
        return SaveReply(written={}, error=describe_error(e))


_MESH: list[Any] = []


def _rebuild(node: Any, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from orchestrator.checkpoint.snapshot import Sharded

    if isinstance(node, dict):
        return {k: _rebuild(v, world) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebuild(v, world) for v in node]
    if isinstance(node, Sharded):
        # FSDP2's mesh is the whole gang, one dimension: the child's group is the same shape.
        if len(node.placements) != 1:
            raise ValueError("async_mode: process supports 1-D device meshes only; "
                             "use async_mode: thread")
        if not _MESH:
            _MESH.append(init_device_mesh("cpu", (world,)))
        return DTensor.from_local(node.local, _MESH[0], node.placements, run_check=False,
                                  shape=node.shape, stride=node.stride)
    return node
