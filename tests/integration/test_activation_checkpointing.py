"""Activation checkpointing changes memory, never the math: every mode's gradients equal the
`none` mode's, under DDP and FSDP2, on real torch.distributed (2 gloo processes)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

MODES = ["none", "full", "every_n:2", "selective", "selective:attention"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradients(rank: int, world: int, port: int, parallelism: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from workloads.common import seed_everything
    from workloads.data import token_batch
    from workloads.gpt import GPT, GPTArgs, parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    for mode in MODES:
        a = GPTArgs(n_layer=4, n_embd=32, n_head=4, seq_len=16, batch_size=4,
                    parallelism=parallelism, activation_checkpointing=mode)
        seed_everything(0)
        model = parallelize(GPT(a), a, torch.device("cpu"))
        x, y = token_batch(0, 0, a.batch_size, rank, world, a.seq_len, a.vocab_size)
        model(x, y).backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            name = name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")
            grads[name] = g.detach().clone()
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, f"{parallelism}-{mode}.pt"))
        del model
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_every_mode_has_the_gradients_of_none(tmp_path, parallelism, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
    context = mp.start_processes(_gradients, args=(2, _free_port(), parallelism, str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()  # our own children
            pytest.fail("the gradient processes did not finish within 180 s")
    reference = torch.load(tmp_path / f"{parallelism}-none.pt")
    assert len(reference) == 4 * 12 + 5  # every parameter of the GPT has a gradient
    for mode in MODES[1:]:
        grads = torch.load(tmp_path / f"{parallelism}-{mode}.pt")
        assert grads.keys() == reference.keys()
        for name, g in grads.items():
            # Recomputation replays the same deterministic CPU kernels: bitwise equal.
            assert torch.equal(g, reference[name]), (mode, name, (g - reference[name]).abs().max())
