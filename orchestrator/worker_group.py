"""The gang of worker actors: placement, rendezvous, launch, and observing how ranks end.

`WorkerGroup` is the contract the driver talks to; `RayWorkerGroup` fulfils it with Ray actors
in one placement group that also holds the warm spares. Unit tests give the driver a fake.

Recovery reuses what survived: `form(lost)` replaces only the lost ranks (from spares when
there are any, else with new actors in the freed bundles) and re-forms the process group in
every actor, without re-spawning processes or re-importing torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

from orchestrator.chaos.plan import Fault
from orchestrator.config import JobConfig
from orchestrator.errors import PlacementError
from orchestrator.triage import Ending, RankResult
from orchestrator.messages import AttemptSpec, Rendezvous, WorkerInfo, WorkerOutcome, WorkerReport
from orchestrator.worker import TrainWorker

log = logging.getLogger("orchestrator.worker_group")

DRAIN_DEADLINE_S = 60.0
"""The deadline a chaos drain gives Ray, as a cloud's two-minute warning would (shorter)."""
STANDBY_PING_S = 2.0
"""How long a ready standby may take to answer before it is taken for dead."""
ROOM_RETURN_S = 3.0
"""How long an elastic placement that timed out waits for the bundles of removed placement
groups to be freed before it settles for fewer workers."""


class WorkerStartError(Exception):
    """The actors started but could not form a process group in time (a transient failure)."""


class WorkerGroup(Protocol):
    def form(self, lost_ranks: set[int]) -> list[WorkerInfo]:
        """Make the gang whole and form its process group: start every worker the first
        time; later, replace `lost_ranks` and reuse the other live workers."""

    def ranks_from_spares(self) -> list[int]:
        """The ranks the last form() gave to spares."""

    def ranks_from_standbys(self) -> list[int]:
        """The ranks the last form() gave to standbys (warm, holding no resources)."""

    def warm_up_replacements(self) -> None:
        """Start the spares and standbys missing, once the gang trains: a process importing
        torch beside a gang that restores and takes its first step slows that gang."""

    def launch(self, spec: AttemptSpec) -> None:
        """Start one attempt of the workload on every rank (non-blocking)."""

    def wait(self, timeout_s: float) -> list[RankResult]:
        """Ranks whose attempt ended since the last call; returns as soon as one ends."""

    def poll(self, timeout_s: float) -> list[WorkerReport]:
        """Progress and events of the live ranks that answer within `timeout_s`."""

    def kill(self, ranks: set[int]) -> None:
        """Kill these ranks' processes now (hung workers)."""

    def request_stop(self, ranks: set[int], mode: int, reason: str) -> None:
        """Ask these ranks to end the attempt after a checkpoint (see context.StopMode)."""

    def draining_ranks(self) -> set[int]:
        """Ranks on nodes that Ray is draining (a preemption notice for the node)."""

    def missing_workers_placeable(self) -> bool:
        """Whether the gang runs below num_workers and the cluster could now place the rest."""

    def probe(self, ranks: set[int], timeout_s: float) -> list[RankResult]:
        """Of `ranks`, those whose worker does not answer within `timeout_s`, as dead ranks
        (on a dead node, when Ray already knows the node is gone)."""

    def inject(self, rank: int, fault: Fault) -> None:
        """Hand a fault to the rank's running attempt (chaos; fire and forget)."""

    def drain_node(self, rank: int) -> str:
        """Ask Ray to drain the rank's node, as a cloud's preemption notice would; '' when
        Ray accepted, else why not."""

    def cannot_kill_node(self, rank: int) -> str:
        """Why the rank's node must not be killed by chaos ('' when it may): the driver's
        own node would take the driver with it."""

    def shutdown(self) -> None:
        """Kill every actor and release the placement group. Safe to call twice."""


_RemoteWorker = ray.remote(TrainWorker)


@dataclass
class _Slot:
    """One actor and the placement-group bundle it occupies."""

    actor: object
    bundle: int
    info_ref: object
    info: WorkerInfo | None = None
    node_id: str | None = None
    """Where a standby was placed (the node of the bundle it was started in)."""


class RayWorkerGroup:
    def __init__(self, config: JobConfig) -> None:
        self._config = config
        self._pg = None
        self._ranks: list[_Slot | None] = []  # None only while form() replaces a rank
        self._spares: list[_Slot] = []
        self._pending: dict = {}  # run ref -> rank
        self._world = config.scaling.num_workers
        """The world size the gang was placed with: below num_workers when elastic."""
        self._spare_count = config.scaling.spare_workers
        self._from_spares: list[int] = []
        self._standbys: list[_Slot] = []
        """Idle warm processes holding no resources (scaling.standby_workers)."""
        self._from_standbys: list[int] = []
        self._placed_before = False
        """Whether this job placed a gang before (whose bundles Ray may still be freeing)."""

    # --- forming the gang --------------------------------------------------------------------

    def form(self, lost_ranks: set[int]) -> list[WorkerInfo]:
        scaling, failure = self._config.scaling, self._config.failure
        try:
            lost = set(lost_ranks) | self._drain_survivors(failure.drain_timeout_s)
            if self._pg is not None and self._on_draining_nodes(lost):
                # Their bundles sit on nodes about to go: place the whole gang anew.
                self.shutdown()
            if self._pg is None:
                self._place_elastic()
            self.kill(lost)
            deadline = time.monotonic() + failure.worker_start_timeout_s
            freed = {rank: self._ranks[rank] for rank in lost if rank < len(self._ranks)}
            self._ranks = [None if rank in lost or rank >= len(self._ranks) else self._ranks[rank]
                           for rank in range(self._world)]
            self._from_spares, self._from_standbys = [], []
            for rank, slot in enumerate(self._ranks):
                if slot is None:
                    slot = self._take_spare()
                    if slot is not None:
                        self._from_spares.append(rank)
                    elif rank in freed and (slot := self._take_standby(freed[rank])):
                        self._from_standbys.append(rank)
                    self._ranks[rank] = slot or self._new_slot()
            infos = [self._info_of(slot, deadline) for slot in self._ranks]
            port = ray.get(self._ranks[0].actor.free_port.remote(), timeout=_left(deadline))
            backend = "nccl" if scaling.use_gpu else "gloo"
            ray.get([slot.actor.setup.remote(self._rendezvous(rank, infos, port, backend))
                     for rank, slot in enumerate(self._ranks)], timeout=_left(deadline))
        except (GetTimeoutError, RayError) as e:
            self.shutdown()  # a half-formed gang is worth nothing: start clean next time
            raise WorkerStartError(f"workers did not start and rendezvous within "
                                   f"failure.worker_start_timeout_s="
                                   f"{failure.worker_start_timeout_s:.0f}s: "
                                   f"{str(e).splitlines()[0]}") from e
        return infos

    def _place_elastic(self) -> None:
        """All num_workers (+ spares) if the cluster has room within the placement timeout;
        else, when scaling.min_workers allows, as many workers as fit now (no spares), or
        min_workers as soon as they fit (an autoscaler is adding nodes). Below num_workers,
        the autoscaler is asked for room for the whole gang, so that it can grow."""
        scaling = self._config.scaling
        for _ in range(2):
            try:
                self._place(scaling.num_workers, scaling.spare_workers)
                _ask_autoscaler_for([])  # placed in full: no standing request
                return
            except PlacementError:
                if scaling.smallest_world >= scaling.num_workers:
                    raise
            # Ray frees a removed placement group's bundles some time after the removal (the
            # old gang's, and the timed-out one's): a gang re-placed to grow can time out on
            # room it held itself. Once more, then, if that room comes back.
            if not self._placed_before or not _room_comes_back(
                    scaling.resources_per_worker, scaling.num_workers + scaling.spare_workers):
                break
        # A placement group that timed out is gone, and with it the demand an autoscaler
        # scales up for: ask for the whole gang explicitly, then start with what fits.
        _ask_autoscaler_for([dict(scaling.resources_per_worker)] * scaling.num_workers)
        fit = min(_workers_that_fit(scaling.resources_per_worker), scaling.num_workers - 1)
        start_with = max(fit, scaling.smallest_world)
        log.warning("elastic: %s %d of %d workers", "resuming with" if fit >= start_with
                    else "waiting for room for", start_with, scaling.num_workers)
        self._place(start_with, 0)

    def _place(self, workers: int, spares: int) -> None:
        scaling = self._config.scaling
        n = workers + spares
        self._pg = placement_group([dict(scaling.resources_per_worker) for _ in range(n)],
                                   strategy=scaling.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=scaling.placement_timeout_s)
        except GetTimeoutError as e:
            self.shutdown()
            raise PlacementError(
                f"could not place {n} workers with {scaling.resources_per_worker} each within "
                f"{scaling.placement_timeout_s:.0f}s; cluster resources: "
                f"{ray.available_resources()}. Lower scaling.num_workers, "
                f"scaling.spare_workers or scaling.resources_per_worker, raise "
                f"scaling.placement_timeout_s, or allow fewer with scaling.min_workers") from e
        self._world, self._spare_count = workers, spares
        self._placed_before = True

    def _drain_survivors(self, timeout_s: float) -> set[int]:
        """Wait for live ranks to leave the failed attempt; those that do not are lost too."""
        if not self._pending:
            return set()
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending),
                            timeout=timeout_s)
        stuck = {rank for ref, rank in self._pending.items() if ref not in ready}
        self._pending = {}
        if stuck:
            log.warning("ranks %s did not leave the failed attempt within %.1fs: replacing them",
                        sorted(stuck), timeout_s)
        return stuck

    def _new_slot(self) -> _Slot:
        used = {s.bundle for s in self._ranks + self._spares if s is not None}
        total = self._world + self._spare_count
        bundle = min(b for b in range(total) if b not in used)
        resources = dict(self._config.scaling.resources_per_worker)
        actor = _RemoteWorker.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=bundle),
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
            resources=resources, max_concurrency=2, max_restarts=0,
        ).remote(preload=self._config.workload.entrypoint)
        return _Slot(actor=actor, bundle=bundle, info_ref=actor.info.remote())

    def ranks_from_spares(self) -> list[int]:
        return list(self._from_spares)

    def _take_spare(self) -> _Slot | None:
        """The oldest spare: ready, or at least further along than a new actor would be.
        Spares that died meanwhile are dropped."""
        while self._spares:
            slot = self._spares.pop(0)
            ready, _ = ray.wait([slot.info_ref], timeout=0)
            if not ready:
                return slot  # still starting
            try:
                slot.info = ray.get(slot.info_ref)
                return slot
            except RayError:
                _kill(slot.actor)
        return None

    def ranks_from_standbys(self) -> list[int]:
        return list(self._from_standbys)

    def _take_standby(self, lost: _Slot | None) -> _Slot | None:
        """A standby on the lost worker's node, moved into the bundle it freed: ready, or at
        least further along than a new process would be. It holds no resources; on that node
        it uses what the bundle holds for it. Standbys that died meanwhile are dropped."""
        node = lost.info.node_id if lost is not None and lost.info is not None else None
        for slot in list(self._standbys):
            if slot.node_id != node or node is None:
                continue
            self._standbys.remove(slot)
            if ray.wait([slot.info_ref], timeout=0)[0]:
                # Ready: but its answer may predate the loss (a node that died took the
                # standby with it), so ask it again.
                try:
                    slot.info = ray.get(slot.actor.info.remote(), timeout=STANDBY_PING_S)
                except (RayError, GetTimeoutError):
                    _kill(slot.actor)
                    continue
            slot.bundle = lost.bundle
            return slot
        return None

    def warm_up_replacements(self) -> None:
        self._refill_spares()
        self._refill_standbys()

    def _refill_standbys(self) -> None:
        """Start standbys, spread over the gang's bundles (and so its nodes); they import torch
        and the workload, then idle. None for GPU workers: Ray gives a process its GPU when
        it starts, so a process started without one cannot train on it."""
        want = 0 if self._config.scaling.use_gpu else self._config.scaling.standby_workers
        while len(self._standbys) < want and self._ranks:
            anchor = self._ranks[len(self._standbys) % len(self._ranks)]
            if anchor is None or anchor.info is None:
                return
            actor = _RemoteWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=anchor.bundle),
                num_cpus=0, num_gpus=0, max_concurrency=2, max_restarts=0,
            ).remote(preload=self._config.workload.entrypoint)
            self._standbys.append(_Slot(actor=actor, bundle=-1, info_ref=actor.info.remote(),
                                        node_id=anchor.info.node_id))

    def _refill_spares(self) -> None:
        """Start replacement spares; they warm up (import torch) while the gang trains."""
        while len(self._spares) < self._spare_count:
            self._spares.append(self._new_slot())

    def _info_of(self, slot: _Slot, deadline: float) -> WorkerInfo:
        if slot.info is None:
            slot.info = ray.get(slot.info_ref, timeout=_left(deadline))
        return slot.info

    def _rendezvous(self, rank: int, infos: list[WorkerInfo], port: int, backend: str) -> Rendezvous:
        node = infos[rank].node_id
        local_rank = sum(1 for info in infos[:rank] if info.node_id == node)
        return Rendezvous(rank=rank, local_rank=local_rank, world_size=len(infos),
                          master_addr=infos[0].node_ip, master_port=port, backend=backend,
                          timeout_s=self._config.failure.collective_timeout_s)

    # --- running -----------------------------------------------------------------------------

    def launch(self, spec: AttemptSpec) -> None:
        self._pending = {slot.actor.run.remote(spec): rank for rank, slot in enumerate(self._ranks)}

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
        info = self._ranks[rank].info
        node_id = info.node_id if info else ""
        try:
            outcome: WorkerOutcome = ray.get(ref)
        except RayError as e:  # the process is gone: killed, OOM, crashed, node lost
            ending = Ending.DIED if _node_alive(node_id) else Ending.NODE_DIED
            return RankResult(rank=rank, step=-1, ending=ending, error_type=type(e).__name__,
                              message=_death_message(e), node_id=node_id)
        if outcome.ok:
            ending = (Ending.NOTICED if outcome.got_notice else
                      Ending.STOPPED if outcome.stopped else Ending.FINISHED)
            return RankResult(rank=rank, step=outcome.step, ending=ending, node_id=node_id,
                              message=outcome.stopped)
        err = outcome.error
        return RankResult(rank=rank, step=outcome.step, ending=Ending.RAISED, error_type=err.type,
                          message=f"{err.type}: {err.message}", traceback=err.traceback,
                          node_id=node_id)

    def poll(self, timeout_s: float) -> list[WorkerReport]:
        refs = [slot.actor.poll.remote() for slot in self._ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        reports = []
        for ref in ready:
            try:
                reports.append(ray.get(ref))
            except RayError:
                pass  # a dead worker: its run ref reports the death
        return reports

    def probe(self, ranks: set[int], timeout_s: float) -> list[RankResult]:
        refs = {self._ranks[r].actor.poll.remote(): r for r in ranks}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        answered = set()
        for ref in ready:
            try:
                ray.get(ref)
                answered.add(refs[ref])
            except RayError:
                pass
        results = []
        for rank in sorted(set(ranks) - answered):
            node_id = self._ranks[rank].info.node_id if self._ranks[rank].info else ""
            node_died = not _node_alive(node_id)
            results.append(RankResult(
                rank=rank, step=-1, ending=Ending.NODE_DIED if node_died else Ending.DIED,
                node_id=node_id,
                message=("its node left the cluster" if node_died else
                         f"the worker stopped answering (no reply in {timeout_s:.0f}s) "
                         f"while its peers lost their connection to it")))
        return results

    def request_stop(self, ranks: set[int], mode: int, reason: str) -> None:
        for rank in ranks:
            self._ranks[rank].actor.request_stop.remote(mode, reason)

    def draining_ranks(self) -> set[int]:
        draining = _draining_nodes()
        return {rank for rank, slot in enumerate(self._ranks)
                if slot and slot.info and slot.info.node_id in draining}

    def _on_draining_nodes(self, ranks: set[int]) -> bool:
        draining = _draining_nodes()
        return any(self._ranks[r].info and self._ranks[r].info.node_id in draining
                   for r in ranks if r < len(self._ranks) and self._ranks[r])

    def missing_workers_placeable(self) -> bool:
        missing = self._config.scaling.num_workers - self._world
        return missing > 0 and _workers_that_fit(
            self._config.scaling.resources_per_worker) >= missing

    def kill(self, ranks: set[int]) -> None:
        for rank in ranks:
            slot = self._ranks[rank] if rank < len(self._ranks) else None
            if slot is None:
                continue
            _kill(slot.actor)
            if slot.info is not None:
                # ray.kill asks the actor's process to exit, which a stopped or wedged
                # process cannot do; Ray then waits seconds before forcing it. A SIGKILL
                # from a task on the same node ends it at once.
                _sigkill_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    slot.info.node_id, soft=False)).remote(slot.info.pid)

    def inject(self, rank: int, fault: Fault) -> None:
        slot = self._ranks[rank] if rank < len(self._ranks) else None
        if slot is not None:
            slot.actor.inject.remote(fault)

    def drain_node(self, rank: int) -> str:
        node_id = self._node_of(rank)
        if not node_id:
            return f"rank {rank} has no node"
        try:
            from ray.core.generated import autoscaler_pb2

            deadline_ms = (time.time_ns() // 1_000_000) + int(DRAIN_DEADLINE_S * 1000)
            # What `ray drain-node` does (ray/scripts/scripts.py).
            gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
            accepted, why = gcs.drain_node(
                node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                "chaos: drain", deadline_ms)
        except Exception as e:  # noqa: BLE001 -- a private API: a skipped fault, said so
            return f"Ray could not drain node {node_id[:12]}: {type(e).__name__}: {e}"
        return "" if accepted else f"Ray refused to drain node {node_id[:12]}: {why}"

    def cannot_kill_node(self, rank: int) -> str:
        node_id = self._node_of(rank)
        if node_id and node_id == ray.get_runtime_context().get_node_id():
            return f"rank {rank} runs on the driver's node; killing it would kill the driver"
        return ""

    def _node_of(self, rank: int) -> str:
        slot = self._ranks[rank] if rank < len(self._ranks) else None
        return slot.info.node_id if slot is not None and slot.info is not None else ""

    def shutdown(self) -> None:
        for slot in self._ranks + self._spares + self._standbys:
            _kill(slot.actor)
        self._ranks, self._spares, self._standbys, self._pending = [], [], [], {}
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except RayError:
                pass
            self._pg = None
        # Nothing of the job may keep an autoscaler from scaling the cluster down.
        _ask_autoscaler_for([])


@ray.remote(num_cpus=0, max_retries=0)
def _sigkill_on_node(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except RayError:
        pass


def _workers_that_fit(per_worker: dict[str, float]) -> int:
    """How many more workers the cluster's free resources hold, summed over nodes (an upper
    bound: a placement group still has to find room on individual nodes)."""
    free = ray.available_resources()
    counts = [int(free.get(name, 0.0) // amount) for name, amount in per_worker.items() if amount > 0]
    return min(counts) if counts else 0


def _room_comes_back(per_worker: dict[str, float], workers: int) -> bool:
    """Whether the cluster's free resources hold `workers` within ROOM_RETURN_S."""
    deadline = time.monotonic() + ROOM_RETURN_S
    while _workers_that_fit(per_worker) < workers:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _ask_autoscaler_for(bundles: list[dict[str, float]]) -> None:
    """Set the job's standing request to the autoscaler (none: `[]`). It persists in the
    cluster until replaced, so the job clears it when it no longer needs the room. On a
    cluster without an autoscaler nobody reads it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # noqa: BLE001 -- a hint to the autoscaler, never a failure
        log.warning("asking the autoscaler for %d workers' room failed: %s", len(bundles), e)


def _draining_nodes() -> set[str]:
    """Nodes Ray is draining; a preemption notice with a deadline, for a cloud VM."""
    try:
        return set(ray._private.state.state.get_draining_nodes())
    except Exception:  # noqa: BLE001 -- a private API: without it, no early notice
        return set()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _node_alive(node_id: str) -> bool:
    """Ray's view of the node; a node that is not known (yet) counts as alive."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return bool(node["Alive"])
    return True


def _death_message(e: RayError) -> str:
    text = str(e)
    # Ray's message is long; its first sentence says what happened to the process.
    for line in text.splitlines():
        if "died" in line or "exit" in line.lower() or "killed" in line.lower():
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else "the worker actor died"
