"""The gang of worker actors: placement, rendezvous, launch, and observing how ranks end.

`WorkerGroup` is the contract the driver talks to; `RayWorkerGroup` fulfils it with Ray actors
in one placement group. Unit tests give the driver a fake instead.
"""

from __future__ import annotations

import time
from typing import Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import JobConfig
from orchestrator.errors import PlacementError
from orchestrator.failures import RankResult
from orchestrator.messages import AttemptSpec, Rendezvous, WorkerInfo, WorkerOutcome, WorkerReport
from orchestrator.worker import TrainWorker


class WorkerStartError(Exception):
    """The actors started but could not form a process group in time (a transient failure)."""


class WorkerGroup(Protocol):
    def start(self) -> list[WorkerInfo]:
        """Place and start the workers and form their process group."""

    def launch(self, spec: AttemptSpec) -> None:
        """Start one attempt of the workload on every rank (non-blocking)."""

    def wait(self, timeout_s: float) -> list[RankResult]:
        """Ranks whose attempt ended since the last call; waits at most `timeout_s`."""

    def poll(self, timeout_s: float) -> list[WorkerReport]:
        """Progress and events of the live ranks that answer within `timeout_s`."""

    def shutdown(self) -> None:
        """Kill every actor and release the placement group. Safe to call twice."""


_RemoteWorker = ray.remote(TrainWorker)


class RayWorkerGroup:
    def __init__(self, config: JobConfig) -> None:
        self._config = config
        self._actors: list = []
        self._infos: list[WorkerInfo] = []
        self._pg = None
        self._pending: dict = {}  # run ref -> rank

    def start(self) -> list[WorkerInfo]:
        scaling, failure = self._config.scaling, self._config.failure
        n = scaling.num_workers
        bundles = [dict(scaling.resources_per_worker) for _ in range(n)]
        self._pg = placement_group(bundles, strategy=scaling.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=scaling.placement_timeout_s)
        except GetTimeoutError as e:
            self.shutdown()
            raise PlacementError(
                f"could not place {n} workers with {scaling.resources_per_worker} each within "
                f"{scaling.placement_timeout_s:.0f}s; cluster resources: "
                f"{ray.available_resources()}. Lower scaling.num_workers or "
                f"scaling.resources_per_worker, or raise scaling.placement_timeout_s") from e
        resources = dict(scaling.resources_per_worker)
        options = dict(num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                       resources=resources, max_concurrency=2, max_restarts=0)
        self._actors = [
            _RemoteWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i),
                **options).remote()
            for i in range(n)
        ]
        try:
            deadline = time.monotonic() + failure.worker_start_timeout_s
            self._infos = ray.get([a.info.remote() for a in self._actors],
                                  timeout=failure.worker_start_timeout_s)
            port = ray.get(self._actors[0].free_port.remote(), timeout=_left(deadline))
            backend = "nccl" if scaling.use_gpu else "gloo"
            ray.get([a.setup.remote(self._rendezvous(rank, port, backend))
                     for rank, a in enumerate(self._actors)], timeout=_left(deadline))
        except (GetTimeoutError, RayError) as e:
            self.shutdown()
            raise WorkerStartError(f"workers did not start and rendezvous within "
                                   f"failure.worker_start_timeout_s="
                                   f"{failure.worker_start_timeout_s:.0f}s: {e}") from e
        return list(self._infos)

    def _rendezvous(self, rank: int, port: int, backend: str) -> Rendezvous:
        node = self._infos[rank].node_id
        local_rank = sum(1 for info in self._infos[:rank] if info.node_id == node)
        return Rendezvous(rank=rank, local_rank=local_rank, world_size=len(self._actors),
                          master_addr=self._infos[0].node_ip, master_port=port, backend=backend,
                          timeout_s=self._config.failure.collective_timeout_s)

    def launch(self, spec: AttemptSpec) -> None:
        self._pending = {a.run.remote(spec): rank for rank, a in enumerate(self._actors)}

    def wait(self, timeout_s: float) -> list[RankResult]:
        if not self._pending:
            return []
        refs = list(self._pending)
        # Return as soon as any rank ends, then take every other one already ended too.
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return [self._result(ref, self._pending.pop(ref)) for ref in ready]

    def _result(self, ref, rank: int) -> RankResult:
        node_id = self._infos[rank].node_id
        try:
            outcome: WorkerOutcome = ray.get(ref)
        except RayActorError as e:  # the process is gone: killed, OOM, crashed
            return RankResult(rank=rank, step=-1, ok=False, died=True,
                              error_type=type(e).__name__, message=_actor_death(e),
                              node_id=node_id)
        except RayError as e:  # the call itself failed (e.g. the object was lost)
            return RankResult(rank=rank, step=-1, ok=False, died=True,
                              error_type=type(e).__name__, message=str(e), node_id=node_id)
        if outcome.ok:
            return RankResult(rank=rank, step=outcome.step, ok=True, node_id=node_id)
        err = outcome.error
        return RankResult(rank=rank, step=outcome.step, ok=False, error_type=err.type,
                          message=f"{err.type}: {err.message}", traceback=err.traceback,
                          node_id=node_id)

    def poll(self, timeout_s: float) -> list[WorkerReport]:
        refs = [a.poll.remote() for a in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        reports = []
        for ref in ready:
            try:
                reports.append(ray.get(ref))
            except RayError:
                pass  # a dead worker: its run ref reports the death
        return reports

    def shutdown(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
        self._actors, self._pending = [], {}
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except RayError:
                pass
            self._pg = None


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _actor_death(e: RayActorError) -> str:
    text = str(e)
    # Ray's message is long; its first sentence says what happened to the process.
    for line in text.splitlines():
        if "died" in line or "exit" in line.lower() or "killed" in line.lower():
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else "the worker actor died"
