"""The memory tier's arenas (checkpoint/memory_arena.py): a state laid out in slots and
rebuilt, and an arena in /dev/shm that another process maps, trusts only once published and
only with the owner's token, and keeps after the owner is killed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import time

import pytest
import torch

from orchestrator.checkpoint import memory_arena as ma


def _state(scale: float = 1.0) -> dict:
    return {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale,
                      "b": torch.ones(5, dtype=torch.bfloat16) * scale,
                      "n": torch.tensor(7, dtype=torch.int64)},
            "optimizer": {"param_groups": [{"lr": 0.1 * scale, "params": ["w", "b"]}]},
            "step": 3, "rng": [torch.arange(3, dtype=torch.uint8), "mt19937"]}


def _arena_of(state: dict, shared: bool) -> tuple[ma.Layout, ma.Arena]:
    import pickle

    layout = ma.Layout(state, deferred_storages=set())
    _, tensors, values = ma.flatten(state)
    arena = ma.Arena.create(pickle.dumps(layout.skeleton), 100, layout.tensor_bytes, shared)
    arena.begin()
    ma.copy_all(ma.views(layout.slots, arena.tensor_data), tensors)
    assert arena.write_values(ma.frozen_values(values))
    return layout, arena


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_state_laid_out_in_slots_rebuilds_equal_and_its_slots_are_aligned():
    state = _state()
    layout, arena = _arena_of(state, shared=False)
    assert all(s.offset % 64 == 0 for s in layout.slots)
    assert arena.published_step() is None  # written, not yet published
    arena.publish(3)
    assert arena.published_step() == 3
    assert _equal(ma.read_copy(arena), state)
    # The same structure fits; another shape, another key or a moved stable tensor does not.
    spec, tensors, _ = ma.flatten(_state(2.0))
    assert layout.fits(spec, tensors)
    other = _state()
    other["model"]["w"] = torch.zeros(4, 3)
    assert not layout.fits(*ma.flatten(other)[:2])
    other = _state()
    other["model"]["extra"] = torch.zeros(1)
    assert not layout.fits(*ma.flatten(other)[:2])
    stable = ma.Layout(state, deferred_storages={state["model"]["w"].untyped_storage().data_ptr()})
    assert stable.deferred == [0] and not stable.fits(spec, tensors)


def test_begin_voids_what_the_arena_held_until_the_next_publish():
    _, arena = _arena_of(_state(), shared=False)
    arena.publish(3)
    arena.begin()
    assert arena.published_step() is None


def test_values_larger_than_the_room_left_are_refused():
    _, arena = _arena_of(_state(), shared=False)
    assert not arena.write_values(["x" * (1 << 20)])


def test_a_shared_arena_is_a_private_file_that_only_its_token_opens(tmp_path):
    _, arena = _arena_of(_state(), shared=True)
    assert arena.path is not None and arena.path.startswith("/dev/shm/orchestrator-memory-")
    assert stat.S_IMODE(os.stat(arena.path).st_mode) == 0o600  # no other user maps it
    described = arena.describe()
    assert ma.Arena.open({**described, "token": (1, 2)}) is None
    assert ma.Arena.open({**described, "size": described["size"] + 64}) is None
    mapped = ma.Arena.open(described)
    assert mapped is not None and mapped.published_step() is None
    arena.publish(3)
    assert mapped.published_step() == 3 and _equal(ma.read_copy(mapped), _state())
    arena.unlink()
    assert not os.path.exists(described["path"]) and arena.describe() is None
    assert ma.Arena.open(described) is None  # gone: a late buddy falls back to gloo
    assert mapped.published_step() == 3  # the mapping holds the pages


def test_no_room_in_dev_shm_means_a_private_arena(monkeypatch):
    monkeypatch.setattr(ma, "shm_room", lambda nbytes: False)
    _, arena = _arena_of(_state(), shared=True)
    assert arena.path is None and arena.describe() is None


def _owner(conn) -> None:
    _, arena = _arena_of(_state(3.0), shared=True)
    arena.publish(9)
    conn.send(arena.describe())
    conn.recv()  # mapped
    arena.unlink()
    conn.send("unlinked")
    signal.pause()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_the_buddy_keeps_a_published_copy_after_its_owner_is_killed():
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    owner = ctx.Process(target=_owner, args=(there,), daemon=True)
    owner.start()
    try:
        described = here.recv()
        mapped = ma.Arena.open(described)
        assert mapped is not None
        here.send("mapped")
        assert here.recv() == "unlinked"
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(10)
    assert owner.exitcode == -signal.SIGKILL
    assert not os.path.exists(described["path"])  # nothing left behind in /dev/shm
    assert mapped.published_step() == 9 and _equal(ma.read_copy(mapped), _state(3.0))


def test_files_left_by_a_kill_during_set_up_are_swept_and_no_others(monkeypatch, tmp_path):
    monkeypatch.setattr(ma, "SHM_DIR", str(tmp_path))
    dead = subprocess_pid_that_exited()
    left = tmp_path / f"{ma.PREFIX}{dead}-abc"
    fresh = tmp_path / f"{ma.PREFIX}{dead}-new"  # a set-up may still be mapping it
    mine = tmp_path / f"{ma.PREFIX}{os.getpid()}-xyz"  # a live process's
    other = tmp_path / "someone-else"
    for p in (left, fresh, mine, other):
        p.write_bytes(b"x")
    old = time.time() - 2 * ma.STALE_AFTER_S
    for p in (left, mine, other):
        os.utime(p, (old, old))
    assert ma.sweep_stale_files() == [str(left)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (fresh, mine, other))


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)
