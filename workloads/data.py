"""Deterministic synthetic token streams, indexed by global sample number.

Sample g is a function of (seed, g) alone, so a resumed run continues with exactly the samples
it would have seen, at any world size: rank r of W takes samples
[position + r*B/W, position + (r+1)*B/W) of the global batch of B.
"""

from __future__ import annotations

import torch

from orchestrator.data.order import rank_slice


def sample_tokens(seed: int, index: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """One sequence of seq_len+1 tokens: an arithmetic progression mod vocab with 10% noise,
    learnable in context (the model must infer the stride)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = torch.randint(vocab_size, (1,), generator=g)
    stride = torch.randint(1, 8, (1,), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab_size
    noise = torch.rand(seq_len + 1, generator=g) < 0.1
    return torch.where(noise, torch.randint(vocab_size, (seq_len + 1,), generator=g), seq)


def token_batch(seed: int, position: int, global_batch: int, rank: int, world_size: int,
                seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([sample_tokens(seed, i, seq_len, vocab_size)
                        for i in rank_slice(position, global_batch, rank, world_size)])
    return rows[:, :-1], rows[:, 1:]
