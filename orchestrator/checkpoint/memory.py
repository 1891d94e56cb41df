"""The memory tier: every rank keeps its state of a recent step in host memory, and a copy of
its buddy's, so that a failure costs at most a step or so instead of everything since the
last storage checkpoint.

After step s (every `checkpoint.memory_interval_steps`; with `auto`, the default, an interval
the ranks measure so that the copies cost at most 5% of the training time: memory_pace.py),
each rank
  1. copies its state into an arena laid out for it (memory_arena.py: what may change before
     the next optimizer step now, parameters and optimizer state on the memory thread while
     the next step's forward and backward run -- or at once, where they are too small for
     the handoff to pay: `copy_inline`), and
  2. makes the copy rank (r-1) mod N's too: on one node that rank maps the arena (shared
     pages: nothing is sent); otherwise, on the memory thread, it sends the copy to rank
     (r-1) and receives rank (r+1)'s over a gloo group of its own (the buddy ring).
The next `optimizer.step()` waits for both (a StepGate): by the time step s+1 changes a
weight, the state of step s is in two processes. Two generations are kept, so that the
newest step every rank completed is still held while the next one is taken.

Any single loss, and any set of losses no two of which are neighbours in the ring, leaves
every rank's state in some surviving process. The copies live on the worker actor, which
outlives an attempt; a replacement starts with none. At the next attempt's restore the gang
gathers what each process holds, `choose_memory_step` (pure) picks the newest step held for
every rank, holders send the missing copies to the replacements, and every rank loads its
copy -- or, if anything is missing or does not fit, they all restore from storage instead.
Storage checkpoints, their commit protocol and their guarantees are untouched: the memory
tier is only ever tried first.

Copies cross between processes of the same job only (the trust of Ray's own pickles); what
comes from storage never passes through here.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import math
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from orchestrator.checkpoint.memory_pace import COST_BUDGET, CopyPace
from orchestrator.checkpoint.restore import with_rng
from orchestrator.checkpoint.memory_arena import (Arena, Layout, copy_all, flatten, frozen_values,
                                                 markers_in, read_copy, rebuild, views)
from orchestrator.checkpoint.snapshot import (Sharded, StepGate, optimizers_in, plain_state,
                                             stable_storages)

Emit = Callable[..., None]
log = logging.getLogger(__name__)

OWN, BUDDY = "own", "buddy"


# --- what the gang holds, and the choice (pure) --------------------------------------------


@dataclass(frozen=True)
class Held:
    """One copy a process holds: rank `rank`'s state after `step`."""

    rank: int
    step: int
    kind: str
    """OWN (the holder took it of itself) or BUDDY (received from its neighbour)."""


@dataclass(frozen=True)
class MemoryChoice:
    step: int
    holders: tuple[int, ...]
    """For each rank, the rank that holds its copy (itself when it survived)."""


def choose_memory_step(world_size: int, held: list[list[Held]],
                       at_least: int) -> MemoryChoice | str:
    """The newest step at which every rank's state is held by some process of the gang, and
    who holds each: a rank's own copy where it has one, else any holder. `held[p]`: what the
    process now at rank p holds. A step older than `at_least` (the newest storage checkpoint)
    is not worth it. Returns why not, when no step qualifies."""
    if not any(held):
        return "no rank holds a copy (every process is new)"
    by_step: dict[int, dict[int, list[int]]] = {}
    for process, copies in enumerate(held):
        for c in copies:
            if 0 <= c.rank < world_size:
                by_step.setdefault(c.step, {}).setdefault(c.rank, []).append(process)
    for step in sorted(by_step, reverse=True):
        if step < at_least:
            break
        holders = by_step[step]
        if len(holders) == world_size:
            return MemoryChoice(step, tuple(r if r in holders[r] else min(holders[r])
                                            for r in range(world_size)))
    newest = max(by_step)
    missing = sorted(set(range(world_size)) - set(by_step[newest]))
    if newest < at_least:
        return f"storage holds a newer step ({at_least}) than memory ({newest})"
    return (f"no step is held for every rank (at step {newest}, nobody holds rank(s) "
            f"{', '.join(map(str, missing))}: neighbours lost together?)")


# --- copies: a snapshot's nested state, split for the wire and filled back ------------------


@dataclass(frozen=True)
class _Leaf:
    """Where a tensor was in a copy's nested state (the tensors travel separately)."""

    index: int
    shape: tuple[int, ...]
    dtype: str


INLINE_COPY_BYTES = 8 << 20
"""Below this many bytes of parameters and optimizer state, a copy is taken at once on the
training thread instead of behind the step gate on the memory thread: handing 1.3 MB (the
main job's GPT) to the thread and back cost its step 0.8 ms more than copying it inline
(0.1 ms at ~13 GB/s here); 8 MB copies in about what the handoff costs."""


def copy_inline(deferred_bytes: int, over_gloo: bool) -> bool:
    """Whether a copy is cheaper taken at once than overlapped with the next step. A copy
    that is also sent over gloo always goes to the memory thread: the exchange waits on a
    peer, which the training thread must not."""
    return not over_gloo and deferred_bytes < INLINE_COPY_BYTES


class Copy:
    """Rank `rank`'s state after `step`, as one process holds it. `state` (CPU tensors,
    `Sharded` for DTensor shards, plain values) is rebuilt from the arena only when a
    restore needs it (`source`): a copy itself is just bytes in slots."""

    def __init__(self, rank: int, step: int, generation: int, kind: str, *,
                 state: dict[str, Any] | None = None,
                 source: Callable[[], dict[str, Any]] | None = None) -> None:
        self.rank, self.step, self.generation, self.kind = rank, step, generation, kind
        self._state, self._source = state, source

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._source()
        return self._state


def split(state: Any) -> tuple[Any, list[torch.Tensor]]:
    """(the structure with tensors replaced by _Leaf markers, the tensors in order)."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, Sharded):
            return Sharded(walk(node.local), node.shape, node.stride, node.placements)
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return _Leaf(len(tensors) - 1, tuple(node.shape), str(node.dtype).removeprefix("torch."))
        return node

    return walk(state), tensors


def join(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, Sharded):
            return Sharded(walk(node.local), node.shape, node.stride, node.placements)
        if isinstance(node, _Leaf):
            return tensors[node.index]
        return node

    return walk(skeleton)


def leaves(skeleton: Any) -> list[_Leaf]:
    return markers_in(skeleton, _Leaf)


class Mismatch(ValueError):
    """A copy does not fit the state it would be loaded into."""


def check_fits(live: Any, saved: Any, path: str = "") -> None:
    """Raise Mismatch unless `saved` has the structure, shapes and dtypes of `live` (the state
    as `state_dict()` gives it now). Nothing is changed."""
    if isinstance(live, Stateful):
        live = live.state_dict()
    if isinstance(live, dict):
        if not isinstance(saved, dict) or saved.keys() != live.keys():
            raise Mismatch(f"{path or 'the state'}: keys differ")
        for k in live:
            check_fits(live[k], saved[k], f"{path}.{k}" if path else str(k))
    elif isinstance(live, list):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise Mismatch(f"{path}: lengths differ")
        for i, (a, b) in enumerate(zip(live, saved)):
            check_fits(a, b, f"{path}.{i}")
    elif isinstance(live, torch.Tensor):
        local = live._local_tensor if isinstance(live, DTensor) else live
        tensor = saved.local if isinstance(saved, Sharded) else saved
        if isinstance(live, DTensor) != isinstance(saved, Sharded) \
                or not isinstance(tensor, torch.Tensor) \
                or tensor.shape != local.shape or tensor.dtype != local.dtype:
            raise Mismatch(f"{path}: a tensor of another kind, shape or dtype")


def load_into(live: Any, saved: Any) -> Any:
    """Load `saved` (checked with check_fits) the way DCP loads a checkpoint: tensors copied
    in place into the state's own tensors (a DTensor's local shard), other values replaced,
    then `load_state_dict` on each Stateful. Returns the loaded value of `live`."""
    if isinstance(live, Stateful):
        live.load_state_dict(load_into(live.state_dict(), saved))
        return live
    if isinstance(live, dict):
        return {k: load_into(v, saved[k]) for k, v in live.items()}
    if isinstance(live, list):
        return [load_into(v, s) for v, s in zip(live, saved)]
    if isinstance(live, torch.Tensor):
        local = live._local_tensor if isinstance(live, DTensor) else live
        with torch.no_grad():
            local.copy_(saved.local if isinstance(saved, Sharded) else saved)
        return live
    return copy.deepcopy(saved)


# --- moving copies between processes ------------------------------------------------------


def _by_dtype(leaves_: list[_Leaf]) -> dict[str, list[_Leaf]]:
    groups: dict[str, list[_Leaf]] = {}
    for leaf in leaves_:
        groups.setdefault(leaf.dtype, []).append(leaf)
    return dict(sorted(groups.items()))  # both sides walk the dtypes in one order


def exchange(group: dist.ProcessGroup, send_to: int | None, sending: Copy | None,
             recv_from: int | None, buffers: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Send `sending`'s state to `send_to` while receiving one from `recv_from` (either may be
    None), over point-to-point messages of `group`: the structure's size, the structure, then
    the tensors packed into one message per dtype (121 messages, one per tensor of the main
    job's GPT, took 11 ms; packed, 3). The packed buffers received are kept in `buffers`
    (by dtype) and reused while their sizes stay the same; the returned state's tensors are
    views of them."""

    def both(out: list[torch.Tensor], into: list[torch.Tensor]) -> None:
        works = [dist.isend(t, send_to, group=group) for t in out]
        works += [dist.irecv(t, recv_from, group=group) for t in into]
        for w in works:
            w.wait()

    packed: list[torch.Tensor] = []
    body: list[torch.Tensor] = []
    if sending is not None:
        skeleton, tensors = split({"rank": sending.rank, "step": sending.step,
                                   "state": sending.state})
        body = [torch.frombuffer(bytearray(pickle.dumps(skeleton)), dtype=torch.uint8)]
        for same in _by_dtype(leaves(skeleton)).values():
            # One C++ call per dtype: the copy costs less than the messages it saves.
            packed.append(torch.cat([tensors[leaf.index].detach().reshape(-1)
                                     for leaf in same]))
    size = [torch.zeros(1, dtype=torch.int64)] if recv_from is not None else []
    both([torch.tensor([body[0].numel()])] if body else [], size)
    got = [torch.empty(int(size[0].item()), dtype=torch.uint8)] if size else []
    both(body, got)
    if not got:
        both(packed, [])
        return None
    structure = pickle.loads(got[0].numpy().tobytes())  # a peer of this job (see the top)
    theirs: dict[int, torch.Tensor] = {}
    received: list[torch.Tensor] = []
    for dtype, same in _by_dtype(leaves(structure)).items():
        numels = [math.prod(leaf.shape) for leaf in same]
        buf = buffers.get(dtype)
        if buf is None or buf.numel() != sum(numels):
            buf = buffers[dtype] = torch.empty(sum(numels), dtype=getattr(torch, dtype))
        received.append(buf)
        for leaf, part in zip(same, torch.split(buf, numels)):
            theirs[leaf.index] = part.view(leaf.shape)
    both(packed, received)
    return join(structure, [theirs[i] for i in range(len(theirs))])


# --- the tier itself: kept by the worker actor across attempts ------------------------------


class _Generation:
    """Buffers for one held step: this rank's arena (per attempt: memory_arena.py), and the
    buddy copy received over gloo, where the buddy is on another node."""

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.slots: list[torch.Tensor] = []
        """The arena's tensors, one per tensor of the layout."""
        self.buddy_buffers: dict[str, torch.Tensor] = {}


@dataclass
class _Job:
    step: int
    generation: int
    deferred: tuple[list[torch.Tensor], list[torch.Tensor]]
    """(arena slots, live tensors) still to copy: the parameters and optimizer state."""
    own: Copy
    arena: Arena
    publish: bool
    """Whether the buddy may take this step from the arena (its values are there too)."""
    ring: dist.ProcessGroup | None
    done: threading.Event
    future: concurrent.futures.Future | None = None


@dataclass
class _Links:
    """How this attempt's copies reach the buddies: through shared pages (same node), over
    gloo, or (after a layout change broke the shared pages) not at all until the next
    attempt."""

    layout: Layout
    out_shared: bool
    """Rank r-1 maps this rank's arenas: publishing a copy there is all it takes."""
    send: bool
    """Rank r-1 receives this rank's copies over gloo."""
    receive: bool
    """This rank receives rank r+1's copies over gloo (else it maps them, or is alone)."""


class MemoryTier:
    """The copies one worker holds. Lives on the TrainWorker (it outlives attempts); each
    attempt calls `begin_attempt`, then `restore` once, then `capture` after steps."""

    def __init__(self, *, share_memory: bool = True) -> None:
        """`share_memory=False`: buddies on one node exchange copies over gloo as if they
        were on two (to test that path on one machine)."""
        self._share = share_memory
        self._lock = threading.Lock()
        self._held: list[Copy] = []
        """Own copies, and buddy copies received over gloo."""
        self._links: _Links | None = None
        """This attempt's layout and links, from its first copy on (None before)."""
        self._buddy_arenas: list[Arena] = []
        self._buddy_rank = -1
        """The arenas of rank `_buddy_rank` mapped here: its copies, held here for nothing."""
        self._relaid_out = False
        self._generations = [_Generation(), _Generation()]
        self._fingerprint: tuple[int, str] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memory")
        self._job: _Job | None = None
        self._gate: StepGate | None = None
        self._rank = 0
        self._world_size = 1
        self._group: dist.ProcessGroup | None = None
        """The training thread's gloo group (restores)."""
        self._ring: dist.ProcessGroup | None = None
        """The memory thread's gloo group (the buddy exchange)."""
        self._interval = 0
        self._pace: CopyPace | None = None
        """With `auto`: the probe of this attempt, until the interval is known."""
        self._learned_interval = 0
        """With `auto`: the interval the gang agreed on (kept across attempts; 0: not yet)."""
        self._emit: Emit = lambda *a, **k: None
        self._state: dict[str, Any] | None = None
        self.wait_s = 0.0
        """Time the training thread waited for the memory tier's copies, in total."""
        self.setup_s = 0.0
        """How long the last attempt's set-up took (layout, arenas, mapping the buddy's)."""

    # --- per attempt -----------------------------------------------------------------------

    def begin_attempt(self, *, rank: int, world_size: int, parallelism: str,
                      group: dist.ProcessGroup, ring: dist.ProcessGroup | None,
                      interval_steps: int | str, emit: Emit) -> None:
        """A new attempt, on the gang's new group. Copies of another world size or
        parallelism are dropped: their shards do not fit this gang (nor does its pace).
        `interval_steps`: a number (0: off) or `auto`."""
        self._abandon_job()
        fingerprint = (world_size, parallelism)
        if self._fingerprint != fingerprint:
            self.clear()
            self._learned_interval = 0
        self._fingerprint = fingerprint
        self._rank, self._world_size = rank, world_size
        self._group, self._ring = group, ring
        auto = interval_steps == "auto"
        # Probe unless learned; the restore's gather settles it for the whole gang.
        self._pace = CopyPace() if auto else None
        self._interval = (self._learned_interval or 1) if auto else int(interval_steps)
        if ring is None:
            self._interval = 0
        self._emit = emit
        self._state = None
        self._gate = StepGate(self._on_gate_wait)
        self._links = None  # set up again at the first copy: the gang has changed
        self._relaid_out = False

    def wait_for_copy(self) -> None:
        """Until the copy in flight (if any) is complete."""
        self._wait_for_job()

    def end_attempt(self, timeout_s: float | None) -> None:
        """The attempt is over: wait (at most `timeout_s`) for the copy in flight."""
        job = self._job
        if job is not None and job.future is not None:
            concurrent.futures.wait([job.future], timeout=timeout_s)
        if self._gate is not None:
            self._gate.remove()
        # Nothing of the attempt may stay referenced: peers notice a failed rank only when its
        # groups' last references go (worker.py), and the state holds the model's group.
        self._state = self._group = self._ring = None

    def clear(self) -> None:
        with self._lock:
            self._held = []
            self._buddy_arenas = []

    def held(self) -> list[Held]:
        with self._lock:
            found = [Held(c.rank, c.step, c.kind) for c in self._held]
            arenas = list(self._buddy_arenas)
        for arena in arenas:
            step = arena.published_step()
            if step is not None:
                found.append(Held(self._buddy_rank, step, BUDDY))
        return found

    def _copies_at(self, step: int) -> dict[int, Copy]:
        with self._lock:
            by_rank = {c.rank: c for c in self._held if c.step == step}
            arenas = list(self._buddy_arenas)
        for arena in arenas:
            if arena.published_step() == step and self._buddy_rank not in by_rank:
                by_rank[self._buddy_rank] = Copy(self._buddy_rank, step, -1, BUDDY,
                                                 state=read_copy(arena))
        return by_rank

    # --- restore ---------------------------------------------------------------------------

    def restore(self, state: dict[str, Any], *, newest_in_storage: int) -> int | None:
        """Collective (the training thread's group). Load into `state` the newest step the gang holds completely
        for every rank, if at least as new as storage's; return it, or None (restore from
        storage: every rank returns the same). Either way, `capture` then copies `state`."""
        self._state = state
        if self._interval <= 0:
            return None
        group = self._group
        t0 = time.monotonic()
        # One gather: what each process holds, and the interval it learned (`auto`).
        told: list[Any] = [None] * self._world_size
        dist.all_gather_object(told, (self.held(), self._learned_interval), group=group)
        gathered: list[list[Held]] = [list(held) for held, _ in told]
        known = max(learned for _, learned in told)
        if self._pace is not None and known > 0:
            # Survivors know the pace; a replacement learns it rather than probe again.
            self._interval = self._learned_interval = known
            self._pace = None
        choice = choose_memory_step(self._world_size, gathered, newest_in_storage)
        if isinstance(choice, str):
            if self._rank == 0 and any(gathered):
                log.warning("memory tier not used: %s; restoring from storage", choice)
                self._emit("memory_restore_skipped", reason=choice,
                           storage_step=newest_in_storage)
            self.clear()
            return None
        mine, problem = None, ""
        try:
            mine = self._gather_copy(choice, group)
            check_fits(with_rng(self._rank, state), mine.state)
        except Mismatch as e:
            problem = f"rank {self._rank}: {e}"
        problems: list[str] = [""] * self._world_size
        dist.all_gather_object(problems, problem, group=group)
        problems = [p for p in problems if p]
        if problems:
            if self._rank == 0:
                log.warning("memory tier not used: %s; restoring from storage", problems[0])
                self._emit("memory_restore_skipped", reason=problems[0],
                           storage_step=newest_in_storage)
            self.clear()
            return None
        live = with_rng(self._rank, state)
        loaded = load_into(live, mine.state)
        for k, v in live.items():  # as DCP does: a plain top-level value is replaced
            if k in state and not isinstance(v, Stateful):
                state[k] = loaded[k]
        with self._lock:
            self._held = [c for c in self._held if c.step <= choice.step]
            self._buddy_arenas = [a for a in self._buddy_arenas
                                  if (a.published_step() or 0) <= choice.step]
        if self._rank == 0:
            sources = [{"rank": r, "holder": h, "kind": OWN if h == r else BUDDY}
                       for r, h in enumerate(choice.holders)]
            log.info("restored step %d from memory (%s)", choice.step,
                     ", ".join(f"rank {s['rank']}: {s['kind']}"
                               + (f" copy on rank {s['holder']}" if s['holder'] != s['rank'] else "")
                               for s in sources))
            self._emit("memory_restored", step=choice.step, storage_step=newest_in_storage,
                       sources=sources, load_s=round(time.monotonic() - t0, 3))
        return choice.step

    def _gather_copy(self, choice: MemoryChoice, group: dist.ProcessGroup) -> Copy:
        """Every rank ends with its own state of `choice.step`: holders send the copies of
        ranks that lost theirs (one transfer at a time, in rank order; every rank walks the
        same list)."""
        by_rank = self._copies_at(choice.step)
        mine = by_rank.get(self._rank) if choice.holders[self._rank] == self._rank else None
        for rank, holder in enumerate(choice.holders):
            if holder == rank:
                continue
            if self._rank == holder:
                exchange(group, rank, by_rank[rank], None, {})
            elif self._rank == rank:
                state = exchange(group, None, None, holder, {})
                mine = Copy(state["rank"], state["step"], -1, BUDDY, state=state["state"])
        assert mine is not None and mine.rank == self._rank and mine.step == choice.step
        return mine

    # --- capture ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self._interval > 0 and self._state is not None and step % self._interval == 0

    def capture(self, step: int) -> None:
        """After `step` (training thread, every rank at the same steps): snapshot the state
        and start the copy and the buddy exchange on the memory thread, if it is due."""
        if self._interval <= 0 or self._state is None:
            return
        if self._pace is not None:
            take = self._pace.tick(time.monotonic())
            if self._pace.measured:
                self._settle_interval(step)
                take = self.due(step)
            if not take:
                return
        elif not self.due(step):
            return
        self._wait_for_job()
        state = with_rng(self._rank, self._state)
        spec, tensors, values = flatten(state)
        if self._links is None:
            self._set_up(state, values)
        elif not self._links.layout.fits(spec, tensors):
            self._lay_out_again(step, state, values)
        links = self._links
        with self._lock:
            # Into the generation that does not hold the newest complete step, whose copies
            # (about to be overwritten) are let go first.
            newest = max(self._held, key=lambda c: c.step, default=None)
            gen = 1 - newest.generation if newest is not None else 0
            self._held = [c for c in self._held if c.generation != gen]
        generation = self._generations[gen]
        arena, slots = generation.arena, generation.slots
        arena.begin()  # the buddy's view of this generation is void from here
        layout = links.layout
        # What the next forward and backward may change (RNG, buffers): now. The parameters
        # and optimizer state: on the memory thread, behind the step gate.
        copy_all([slots[i] for i in layout.immediate], [tensors[i] for i in layout.immediate])
        values = frozen_values(values)
        publish = not links.out_shared or arena.write_values(values)
        if not publish:
            # Too large for the room the first copy left: this step is not the buddy's (the
            # arena stays WRITING, so the buddy takes none of it).
            log.warning("memory copy of step %d: its plain values outgrew the arena", step)
        own = Copy(self._rank, step, gen, OWN,
                   source=lambda: rebuild(layout.skeleton, slots, values))
        job = _Job(step=step, generation=gen,
                   deferred=([slots[i] for i in layout.deferred],
                             [tensors[i] for i in layout.deferred]),
                   own=own, arena=arena, publish=publish, ring=self._ring,
                   done=threading.Event())
        self._job = job
        if copy_inline(layout.deferred_bytes, over_gloo=links.send or links.receive):
            self._copy_and_exchange(job)
            return
        self._gate.hook(optimizers_in(self._state))
        self._gate.arm(_GateOn(job.done))
        job.future = self._executor.submit(self._copy_and_exchange, job)

    def _set_up(self, state: dict[str, Any], values: list[Any]) -> None:
        """Collective (the training thread's group), at the first copy of an attempt, the
        same step on every rank: lay out the state, make this attempt's arenas, and map the
        buddy's where it is on this node (memory_arena.py)."""
        t0 = time.monotonic()
        layout = Layout(plain_state(state), stable_storages(state))
        n, r = self._world_size, self._rank
        share = self._share and n > 1
        arenas = self._new_arenas(layout, values, share)
        described: list[Any] = [None] * n
        dist.all_gather_object(described, [a.describe() for a in arenas], group=self._group)
        buddy = (r + 1) % n
        mapped = [Arena.open(d) for d in described[buddy]] if share else []
        in_shared = share and len(mapped) == 2 and all(m is not None for m in mapped)
        shared: list[Any] = [None] * n
        dist.all_gather_object(shared, in_shared, group=self._group)
        for a in arenas:
            a.unlink()  # mapped by whoever will: the pages now live as long as the mappings
        with self._lock:
            # The buddy copies of the last attempt go: this attempt's buddy is mapped now.
            self._buddy_arenas = list(mapped) if in_shared else []
            self._buddy_rank = buddy
        out_shared = n > 1 and bool(shared[(r - 1) % n])
        self._links = _Links(layout, out_shared=out_shared, send=n > 1 and not out_shared,
                             receive=n > 1 and not in_shared)
        self.setup_s = time.monotonic() - t0
        if r == 0 and n > 1:
            through_shm = sum(bool(x) for x in shared)
            log.info("memory tier: %d of %d buddies hold their copies through shared memory, "
                     "%d over gloo (set up in %.1f ms)", through_shm, n, n - through_shm,
                     self.setup_s * 1e3)
            self._emit("memory_links", shared=through_shm, gloo=n - through_shm,
                       setup_ms=round(self.setup_s * 1e3, 1))

    def _new_arenas(self, layout: Layout, values: list[Any], share: bool) -> list[Arena]:
        skeleton = pickle.dumps(layout.skeleton, protocol=pickle.HIGHEST_PROTOCOL)
        values_bytes = len(pickle.dumps(frozen_values(values), protocol=pickle.HIGHEST_PROTOCOL))
        arenas = [Arena.create(skeleton, values_bytes, layout.tensor_bytes, shared=share)
                  for _ in self._generations]
        for generation, arena in zip(self._generations, arenas):
            generation.arena, generation.slots = arena, views(layout.slots, arena.tensor_data)
        return arenas

    def _lay_out_again(self, step: int, state: dict[str, Any], values: list[Any]) -> None:
        """The state's structure or its stable tensors changed within an attempt (rare: a
        new optimizer state entry, a tensor replaced). A new layout, in private arenas: the
        buddy can only map new ones at the next attempt's set-up, and keeps the copies it
        has mapped (true copies of an older step). Copies sent over gloo go on as before."""
        links = self._links
        layout = Layout(plain_state(state), stable_storages(state))
        # Copies held keep their old arena alive through their views of it.
        self._new_arenas(layout, values, share=False)
        # A buddy that maps this rank's old arenas expects nothing over gloo: it keeps the
        # last step published there, and gets no newer one from this rank until the next
        # attempt (a restore then falls back to that step, or to storage).
        self._links = _Links(layout, out_shared=False, send=links.send, receive=links.receive)
        if not self._relaid_out and self._rank == 0:
            log.warning("memory tier: the state's structure changed at step %d; its copies go "
                        "on in a new layout", step)
        self._relaid_out = True
        self._emit("memory_layout_changed", step=step, rank=self._rank)

    def _settle_interval(self, step: int) -> None:
        """Collective (the training thread's group), at the same step on every rank: the
        gang takes the largest interval any rank proposes."""
        pace, self._pace = self._pace, None
        proposal = torch.tensor([pace.proposal()], dtype=torch.int64)
        dist.all_reduce(proposal, op=dist.ReduceOp.MAX, group=self._group)
        self._interval = self._learned_interval = int(proposal.item())
        if self._rank == 0:
            step_s, with_copy_s = pace.step_times()
            log.info("memory tier: a copy every %d step(s) (a step takes %.1f ms, %.1f ms "
                     "with a copy in flight; budget %d%%)", self._interval, step_s * 1e3,
                     with_copy_s * 1e3, COST_BUDGET * 100)
            self._emit("memory_interval", step=step, interval_steps=self._interval,
                       step_ms=round(step_s * 1e3, 2),
                       step_with_copy_ms=round(with_copy_s * 1e3, 2), budget=COST_BUDGET)

    @property
    def interval_steps(self) -> int:
        """Steps between copies now (with `auto`, 1 while it probes); 0: off."""
        return self._interval

    def _copy_and_exchange(self, job: _Job) -> None:
        """The memory thread (or the training thread, for a small copy: `copy_inline`): the
        deferred copy into the arena, published (a buddy that maps the arena holds the step
        from here), then the gloo exchange with any buddy that does not."""
        try:
            copy_all(*job.deferred)
            job.deferred = ([], [])
            if job.publish:
                job.arena.publish(job.step)
            with self._lock:
                self._held.append(job.own)
            n, links = self._world_size, self._links
            send, receive = links.send, links.receive
            if send or receive:
                got = exchange(job.ring, (self._rank - 1) % n if send else None,
                               job.own if send else None,
                               (self._rank + 1) % n if receive else None,
                               self._generations[job.generation].buddy_buffers)
                if got is not None:
                    with self._lock:
                        self._held.append(Copy(got["rank"], got["step"], job.generation,
                                               BUDDY, state=got["state"]))
        except BaseException as e:  # noqa: BLE001 -- a peer gone: the attempt fails anyway
            log.info("memory copy of step %d not completed: %s", job.step, e)
        finally:
            job.ring = None
            job.done.set()

    def _wait_for_job(self) -> None:
        job = self._job
        if job is not None and not job.done.is_set():
            t0 = time.monotonic()
            job.done.wait()
            self.wait_s += time.monotonic() - t0

    def _abandon_job(self) -> None:
        """A copy still in flight from a failed attempt may be stuck on a dead peer: its
        generation's buffers are given up rather than shared with it."""
        job, self._job = self._job, None
        if job is not None and not job.done.is_set():
            with self._lock:
                self._held = [c for c in self._held if c.generation != job.generation]
            self._generations[job.generation] = _Generation()
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="memory")

    def _on_gate_wait(self, waited_s: float) -> None:
        self.wait_s += waited_s


class _GateOn:
    """What StepGate waits on: anything with a `copied` event."""

    def __init__(self, done: threading.Event) -> None:
        self.copied = done
