"""What each rank of a checkpoint-test gang runs (module level: spawned processes import it).

A small MLP under DDP or FSDP2 trains with a real CheckpointManager on real storage; the
scenarios return what the test asserts on (events, steps, tensors)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from orchestrator.chaos.inject import FaultInjector
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.selection import RestorePlan
from orchestrator.checkpoint.storage import Storage
from orchestrator.config import CheckpointConfig, from_dict
from orchestrator.context import TrainState
from workloads.common import seed_everything, wrap_for_parallelism
from workloads.mlp import batch

RUN = "run"


class Trainer:
    def __init__(self, rank: int, world: int, parallelism: str = "ddp", width: int = 16,
                 seed: int = 0, extra: bool = False) -> None:
        self.rank, self.world = rank, world
        seed_everything(seed)
        model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))
        if extra:  # a layer no checkpoint of the plain model has
            model.add_module("extra", nn.Linear(1, 1))
        self.model = wrap_for_parallelism(model, [], parallelism, torch.device("cpu"))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.state = TrainState(self.model, self.optimizer)

    def step(self, step: int) -> float:
        x, y = batch(0, self.state.data_position, 8, self.rank, self.world)
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.state.data_position += 8
        return loss.item()

    def model_tensors(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor
        out = {}
        for k, v in self.model.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            out[k.removeprefix("module.")] = v.detach().clone()
        return out


def make_manager(rank: int, world: int, groups, url: str, cfg: dict[str, Any],
                 events: list[dict], parallelism: str = "ddp") -> CheckpointManager:
    layout = RunLayout(Storage(url), RUN)
    return CheckpointManager(
        layout=layout, rank=rank, world_size=world, parallelism=parallelism, group=groups[0],
        save_group=groups[1], config=from_dict(CheckpointConfig, cfg),
        faults=FaultInjector([], rank, layout),
        emit=lambda kind, **fields: events.append({"kind": kind, "at": time.time(), **fields}))


def train_and_save(rank, world, groups, url, cfg, steps, save_at, parallelism="ddp"):
    """Train `steps` steps, saving after each step in `save_at`; return events, the model
    at each save, and the training thread's total stall."""
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, cfg, events, parallelism)
    trainer = Trainer(rank, world, parallelism)
    start = manager.restore({"train": trainer.state}, RestorePlan(
        candidates=_committed(url)))
    models = {}
    for step in range(start + 1, steps + 1):
        loss = trainer.step(step)
        if step in save_at:
            manager.save(step, {"train": trainer.state}, {"loss": loss})
            models[step] = trainer.model_tensors()
    manager.finish()
    return {"events": events, "models": models, "final": trainer.model_tensors(),
            "start": start, "stall_s": manager.stall_s}


def committed_model(url: str, step: int) -> dict[str, torch.Tensor]:
    from orchestrator.checkpoint.consolidate import load_full_state

    return load_full_state(RunLayout(Storage(url), RUN), step)["train"]["model"]


def _committed(url: str) -> list[int]:
    from orchestrator.checkpoint.commit import committed_checkpoints
    candidates, _ = committed_checkpoints(RunLayout(Storage(url), RUN))
    return [c.step for c in candidates]


# --- fault injection inside a rank ---------------------------------------------------------


def patch_writer(rank: int, *, slow_rank: int = -1, slow_s: float = 0.0,
                 fail_step: int = -1, fail_rank: int = -1, wrote_at: dict | None = None) -> None:
    """Make this rank's DCP writes slow, or fail at one step (thread and off modes)."""
    import errno

    from orchestrator.checkpoint import manager as manager_module

    real = manager_module.hashing_writer

    def make(layout, step, data_dir):
        writer = real(layout, step, data_dir)
        write_data = writer.write_data

        def slow_or_failing(plan, planner):
            if rank == slow_rank:
                time.sleep(slow_s)
            if step == fail_step and rank == fail_rank:
                raise OSError(errno.ENOSPC, "injected: no space left on device")
            result = write_data(plan, planner)
            if wrote_at is not None:
                result.add_done_callback(lambda _: wrote_at.__setitem__(step, time.time()))
            return result

        writer.write_data = slow_or_failing
        return writer

    manager_module.hashing_writer = make


def async_with_a_slow_and_a_failing_rank(rank, world, groups, url, mode):
    """Saves at 2, 3 and 6. Rank 1 writes slowly (1 s); its write of step 3 fails."""
    wrote_at: dict[int, float] = {}
    patch_writer(rank, slow_rank=1, slow_s=1.0, fail_step=3, fail_rank=1, wrote_at=wrote_at)
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {"async_mode": mode}, events)
    trainer = Trainer(rank, world)
    models, losses, save_returned_at = {}, {}, {}
    for step in range(1, 7):
        losses[step] = trainer.step(step)
        if step in (2, 3, 6):
            manager.save(step, {"train": trainer.state}, {"loss": losses[step]})
            save_returned_at[step] = time.time()
            models[step] = trainer.model_tensors()
    manager.finish()
    return {"events": events, "models": models, "wrote_at": wrote_at,
            "save_returned_at": save_returned_at, "committed": _committed(url)}


def restore_matrix(rank, world, groups, url):
    """One gang walks through every restore and overwrite case; returns what it saw."""
    import torch.distributed as dist

    from orchestrator.checkpoint import commit
    from orchestrator.checkpoint.selection import plan_restore
    from orchestrator.errors import CheckpointError

    layout = RunLayout(Storage(url), RUN)
    seen: dict[str, Any] = {}

    def finish(manager) -> None:
        # Rank 0 commits after the others' saves return: read storage only after it did.
        manager.finish()
        dist.barrier()

    def plan(**cfg):
        candidates, rejected = commit.committed_checkpoints(layout)
        return plan_restore(from_dict(CheckpointConfig, cfg), candidates, rejected, url)

    def fresh(cfg=None, events=None, extra=False):
        trainer = Trainer(rank, world, extra=extra)
        manager = make_manager(rank, world, groups, url, cfg or {},
                               events if events is not None else [])
        return trainer, manager

    # Saves at 2, 4, 6 with made-up losses: step 4 is the best.
    trainer, manager = fresh()
    saved = {}
    for step in range(1, 7):
        trainer.step(step)
        if step % 2 == 0:
            manager.save(step, {"train": trainer.state}, {"loss": {2: 0.5, 4: 0.1, 6: 0.3}[step]})
            saved[step] = trainer.model_tensors()
    finish(manager)
    seen["saved"] = saved

    for name, cfg in [("latest", {}), ("best", {"restore": "best", "best_metric": "loss", "overwrite": True}),
                      ("step2", {"restore": 2, "overwrite": True})]:
        trainer, manager = fresh()
        the_plan = plan(**cfg)
        step = manager.restore({"train": trainer.state}, the_plan)
        seen[name] = (the_plan.candidates, step, trainer.model_tensors(), trainer.state.step)
        manager.close()

    # Model only: the optimizer and the data position keep their fresh values.
    trainer, manager = fresh()
    step = manager.restore({"train": trainer.state},
                           plan(restore=4, overwrite=True, restore_parts=["train.model"]))
    # (torch's get_state_dict initialises missing optimizer state to zeros.)
    moments = [float(s["exp_avg"].abs().max()) for s in trainer.optimizer.state.values()]
    seen["model_only"] = (step, trainer.model_tensors(), trainer.state.data_position,
                          max(moments, default=0.0))
    manager.close()

    # A model with a layer the checkpoint lacks: an error when strict, an event when not.
    trainer, manager = fresh(extra=True)
    try:
        manager.restore({"train": trainer.state}, plan())
        seen["strict_error"] = None
    except CheckpointError as e:
        seen["strict_error"] = str(e)
    manager.close()
    events: list[dict] = []
    trainer, manager = fresh({"strict": False}, events, extra=True)
    step = manager.restore({"train": trainer.state}, plan(strict=False))
    seen["lenient"] = (step, [e for e in events if e["kind"] == "checkpoint_keys_mismatch"],
                       trainer.model_tensors())
    manager.close()

    # A corrupted byte in step 6: the restore falls back to step 4 and marks 6 invalid.
    if rank == 0:
        manifest = commit.read_manifest(layout, 6)
        name = sorted(n for n in manifest.files if n.endswith(".distcp"))[0]
        path = (*layout.data_dir(6, manifest.data_dir), name)
        data = bytearray(layout.storage.read_bytes(*path))
        data[len(data) // 2] ^= 0xFF
        layout.storage.write_atomic(bytes(data), *path)
        seen["corrupted"] = name
    dist.barrier()
    events = []
    trainer, manager = fresh({}, events)
    step = manager.restore({"train": trainer.state},
                           RestorePlan(candidates=[6, 4, 2]))
    seen["fallback"] = (step, [e for e in events if e["kind"] == "checkpoint_invalid"],
                        trainer.model_tensors())
    seen["after_corruption"] = _committed(url)
    # The invalid step may be saved again without overwrite, which clears the mark.
    for step in (5, 6):
        trainer.step(step)
    manager.save(6, {"train": trainer.state}, {"loss": 0.3})
    finish(manager)
    seen["resaved"] = (_committed(url), layout.storage.exists(*layout.invalid_marker(6)))

    # A committed step is refused without overwrite, and replaced atomically with it.
    events = []
    trainer, manager = fresh({}, events)
    try:
        manager.save(6, {"train": trainer.state}, {"loss": 0.3})
        seen["refused"] = None
    except CheckpointError as e:
        seen["refused"] = str(e)
    manager.close()
    old_dir = commit.read_manifest(layout, 6).data_dir
    events = []
    trainer, manager = fresh({"overwrite": True}, events)
    manager.save(6, {"train": trainer.state}, {"loss": 0.3})
    finish(manager)
    new_dir = commit.read_manifest(layout, 6).data_dir
    seen["overwritten"] = (old_dir, new_dir, trainer.model_tensors(), committed_model(url, 6),
                           [e.name for e in layout.storage.list_dir(*layout.step_dir(6))],
                           [e for e in events if e["kind"] == "checkpoint_replaced"])

    # Starting over from step 2 (overwrite): the first new save deletes steps after it.
    events = []
    trainer, manager = fresh({"overwrite": True}, events)
    start = manager.restore({"train": trainer.state}, plan(restore=2, overwrite=True))
    trainer.step(start + 1)
    manager.save(start + 1, {"train": trainer.state}, {"loss": 0.2})
    finish(manager)
    seen["started_over"] = (start, _committed(url),
                            [e for e in events if e["kind"] == "checkpoint_deleted"])
    return seen


def retention(rank, world, groups, url, mode):
    """Saves at 1..9; step 3 reports the best loss."""
    events: list[dict] = []
    cfg = {"async_mode": mode, "keep_last": 2, "keep_every": 4, "keep_best": 1,
           "best_metric": "loss", "best_mode": "min"}
    manager = make_manager(rank, world, groups, url, cfg, events)
    trainer = Trainer(rank, world)
    committed_after = {}
    for step in range(1, 10):
        trainer.step(step)
        manager.save(step, {"train": trainer.state}, {"loss": 0.1 if step == 3 else 1.0 + step})
        manager.settle()  # this save and the retention after it are done
        committed_after[step] = _committed(url)
    manager.finish()
    return {"events": events, "committed_after": committed_after}


def failing_write_in_writer_process(rank, world, groups, url):
    """async_mode: process; step 3's folder cannot be created (a file stands in its place),
    so every rank's writer process fails that save. Training goes on; step 6 commits."""
    import torch.distributed as dist

    layout = RunLayout(Storage(url), RUN)
    if rank == 0:
        layout.storage.write_atomic(b"in the way", *layout.step_dir(3))
    dist.barrier()
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {"async_mode": "process"}, events)
    trainer = Trainer(rank, world)
    for step in range(1, 7):
        trainer.step(step)
        if step in (3, 6):
            manager.save(step, {"train": trainer.state}, {})
    manager.finish()
    return {"events": events, "committed": _committed(url)}


def restore_imported(rank, world, groups, url):
    """Restore the run's latest checkpoint (an import) into a fresh trainer."""
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {}, events)
    trainer = Trainer(rank, world, seed=123)
    step = manager.restore({"train": trainer.state}, RestorePlan(candidates=_committed(url)))
    moments = [float(s["exp_avg"].abs().max()) for s in trainer.optimizer.state.values()]
    manager.close()
    return {"step": step, "model": trainer.model_tensors(), "largest_moment": max(moments),
            "events": events}


def close_waits_for_the_save_in_flight(rank, world, groups, url):
    """A failed attempt closes its manager while a save is in flight (rank 1 writes slowly):
    close() lets that save finish before the attempt ends, up to its timeout."""
    import torch.distributed as dist

    patch_writer(rank, slow_rank=1, slow_s=1.5)
    seen = {}
    for name, step, timeout in [("no_wait", 2, 0.0), ("wait", 4, 30.0)]:
        manager = make_manager(rank, world, groups, url, {"async_mode": "thread"}, [])
        trainer = Trainer(rank, world)
        trainer.step(step)
        manager.save(step, {"train": trainer.state}, {})
        manager.close(timeout_s=timeout)  # what a worker does after its attempt failed
        seen[name] = _committed(url)
        time.sleep(3)  # let the abandoned save of the first case end before the next
        dist.barrier()
    return seen


class FaultyLocal:
    """A fault-injecting fsspec filesystem in front of the local one (a flaky NFS mount, a
    disk with bad sectors): opens of files whose path contains `match` fail with EIO, the
    first `failures` times (-1: always). Everything else passes through."""

    def __init__(self, inner, match: str, failures: int) -> None:
        self._inner = inner
        self.match = match
        self.failures = failures
        self.failed = 0

    def _maybe_fail(self, path) -> None:
        import errno

        if self.match in str(path) and self.failures != 0:
            self.failures -= 1 if self.failures > 0 else 0
            self.failed += 1
            raise OSError(errno.EIO, "injected: Input/output error")

    def open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self._maybe_fail(path)
        return self._inner.open(path, mode, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self._maybe_fail(path)
        return self._inner.cat_file(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def restore_through_read_faults(rank, world, groups, url, match, failures):
    """Save steps 2 and 4; restore with reads of files matching `match` failing `failures`
    times; then restore again with no faults (a later run). Returns both restores. The
    retries wait 10 ms instead of 0.2 s first: the same retries, a persistent fault found in
    seconds."""
    from orchestrator.checkpoint import storage as storage_module

    storage_module.RETRY_INITIAL_S = 0.01
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {}, events)
    trainer = Trainer(rank, world)
    for step in range(1, 5):
        trainer.step(step)
        if step in (2, 4):
            manager.save(step, {"train": trainer.state}, {})
    manager.finish()
    storage = manager._layout.storage
    real = storage.fs
    storage.fs = faulty = FaultyLocal(real, match, failures)
    first = manager.restore({"train": Trainer(rank, world).state},
                            RestorePlan(candidates=_committed(url)))
    storage.fs = real
    second = manager.restore({"train": Trainer(rank, world).state},
                             RestorePlan(candidates=_committed(url)))
    return {"first": first, "second": second, "events": events, "failed": faulty.failed}


def with_s3_attempts(rank, world, groups, attempts: int, scenario, *args):
    """Run `scenario` in this rank with botocore allowed `attempts` tries per S3 request
    (a persistent fault then shows in seconds, not minutes)."""
    from orchestrator.checkpoint import storage

    storage.S3_MAX_ATTEMPTS = attempts
    return scenario(rank, world, groups, *args)


def restore_newest_through_faults(rank, world, groups, url):
    """Restore whatever is newest (read faults, if any, come from the proxy), then again."""
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {}, events)
    first = manager.restore({"train": Trainer(rank, world).state},
                            RestorePlan(candidates=_committed(url)))
    return {"first": first, "events": events}


# --- saves on a failing storage ------------------------------------------------------------

SAVE_STEPS = (2, 4, 6, 8)


def fill_disk(folder: str) -> str:
    """Fill the filesystem holding `folder` to the last byte (a real ENOSPC from the
    kernel for whoever writes next); returns the filler's path."""
    import errno
    import os

    path = os.path.join(folder, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096, 1):  # big chunks, then the last bytes
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return path


def saves_on_failing_storage(rank, world, groups, url, cfg, fail_steps, fill_dir=""):
    """Train steps 1..8, saving at 2, 4, 6 and 8, where the saves of `fail_steps` meet a
    failing storage: a full disk (rank 0 fills `fill_dir`'s filesystem before them and frees
    it after) or whatever the proxy answers. The end of each step does what TrainContext's
    report does (the ranks agree on what a failed save calls for). A StorageFailure the
    manager raises ends the loop and is returned as data, with what storage holds then."""
    import os

    import torch.distributed as dist

    from orchestrator.checkpoint import commit
    from orchestrator.errors import StorageFailure

    layout = RunLayout(Storage(url), RUN)
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, cfg, events)
    trainer = Trainer(rank, world)
    seen: dict[str, Any] = {"raised": None, "models": {}}
    filler = ""

    def step2_files() -> dict[str, bytes]:
        manifest = commit.read_manifest(layout, 2)
        folder = layout.data_dir(2, manifest.data_dir)
        return {"manifest": layout.storage.read_bytes(*layout.manifest(2)),
                **{n: layout.storage.read_bytes(*folder, n) for n in manifest.files}}

    try:
        for step in range(1, 9):
            trainer.step(step)
            (failed,) = manager.agree_max([manager.pending_failure])
            manager.raise_failure(failed)
            if step not in SAVE_STEPS:
                continue
            if fill_dir:
                manager.wait()  # the fault starts and ends between saves, not inside one
                if rank == 0 and step in fail_steps and not filler:
                    filler = fill_disk(fill_dir)
                elif rank == 0 and step not in fail_steps and filler:
                    os.remove(filler)
                    filler = ""
                dist.barrier()
            manager.save(step, {"train": trainer.state}, {})
            seen["models"][step] = trainer.model_tensors()
            if step == 2:
                manager.wait()
                seen["step2_before"] = step2_files() if rank == 0 else None
        manager.finish()
    except StorageFailure as e:
        seen["raised"] = (type(e).__name__, str(e), trainer.state.step)
        manager.close(timeout_s=30)
    if filler:
        os.remove(filler)
    dist.barrier()
    seen["events"] = events
    seen["committed"] = _committed(url)
    seen["step_dirs"] = sorted(layout.step_dirs())
    seen["step2_after"] = step2_files() if rank == 0 else None
    return seen


# --- does every rank reach the same storage? -----------------------------------------------


def _on_disk(rank: int, disks: list[str]) -> None:
    """This rank's `$RANK_DISK`: its own entry of `disks` (ranks may share one), the way a
    per-node variable gives each node's workers their own local folder."""
    import os

    if disks:
        os.environ["RANK_DISK"] = disks[rank]


def probe_storage(rank, world, groups, url, disks=(), driver_token=""):
    """The workers' start-up probe; returns what it raised, and the files it left behind."""
    import torch.distributed as dist

    from orchestrator.checkpoint.storage_probe import check_shared_storage

    _on_disk(rank, list(disks))
    layout = RunLayout(Storage(url), RUN)
    raised = None
    try:
        check_shared_storage(layout, rank, world, groups[0], driver_token)
    except Exception as e:  # noqa: BLE001 -- the test looks at it
        raised = (type(e).__name__, str(e))
    dist.barrier()
    storage = layout.storage
    left = (storage.fs.find(storage.path(RUN, "probes"))
            if storage.exists(RUN, "probes") else [])
    return {"raised": raised, "left": left}


def save_on_separate_disks(rank, world, groups, disks):
    """One sync save with every rank on its own `$RANK_DISK`, and no probe first: the commit
    alone must refuse a manifest that would leave out the ranks rank 0 cannot see."""
    _on_disk(rank, list(disks))
    url = "$RANK_DISK/storage"
    events: list[dict] = []
    manager = make_manager(rank, world, groups, url, {}, events)
    trainer = Trainer(rank, world)
    trainer.step(1)
    manager.save(1, {"train": trainer.state}, {})
    raised = None
    try:
        manager.finish()
    except Exception as e:  # noqa: BLE001 -- the test looks at it
        raised = (type(e).__name__, str(e))
    return {"raised": raised, "events": events, "committed": _committed(url),
            "has_manifest": Storage(url).exists(*RunLayout(Storage(url), RUN).manifest(1))}
