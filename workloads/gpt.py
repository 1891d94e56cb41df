"""A small GPT-style language model, trained on synthetic token streams or on a prepared
Parquet token dataset (`orchestrator data prepare`).

    workload: {entrypoint: "workloads.gpt:train", args: {steps: 40, parallelism: fsdp}}
    workload: {entrypoint: "workloads.gpt:train", args: {data: ./corpus, vocab_size: 257}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from orchestrator.context import TrainContext, TrainState
from orchestrator.data import TokenDataset, TokenSource
from orchestrator.errors import ConfigError, DatasetError
from workloads.activation_checkpointing import ACMode, apply_activation_checkpointing
from workloads.common import global_mean, parse_args, seed_everything, train_loop, warmup_cosine, wrap_for_parallelism
from workloads.data import token_batch


MAX_PARAMETERS = 10**10
"""A size that is a typo here rather than a model (it would not fit a host's memory)."""


@dataclass(kw_only=True)
class GPTArgs:
    steps: int = 40
    seed: int = 0
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 8
    """Global batch (sequences per step over all ranks); split evenly among the ranks."""
    vocab_size: int = 64
    lr: float = 3e-3
    dropout: float = 0.0
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """'ddp' or 'fsdp' (FSDP2, fully_shard per block)."""
    activation_checkpointing: str | dict = "none"
    """'none', 'full', 'every_n:N' and 'selective[:attention,matmul]': see
    workloads/activation_checkpointing.py."""
    data: str = ""
    """A prepared token dataset (local path, file:// or s3:// URL); empty: synthetic tokens."""
    data_check: str = "checksum"
    """Before the job starts: 'checksum' reads every shard once against dataset.json;
    'size' checks sizes and Parquet footers only (for datasets too large to read at start)."""
    data_prefetch: int = 2
    """Batches read ahead in a background thread; 0 reads each batch when the step needs it."""
    data_trace: str = ""
    """A local folder: each rank appends the sample ids of every step to rank<R>.jsonl there
    (to check or debug the data order)."""

    def __post_init__(self) -> None:
        for name in ("steps", "n_layer", "n_embd", "n_head", "seq_len", "batch_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"workload.args.{name} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"workload.args.lr must be > 0, not {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"workload.args.dropout must be in [0, 1), not {self.dropout}")
        if self.data_check not in ("checksum", "size"):
            raise ValueError(f"workload.args.data_check: {self.data_check!r}; use 'checksum' "
                             "or 'size'")
        if self.data_prefetch < 0:
            raise ValueError("workload.args.data_prefetch must be >= 0")
        if self.data_trace and not self.data:
            raise ValueError("workload.args.data_trace needs workload.args.data")
        if self.n_embd % self.n_head:
            raise ValueError(f"workload.args.n_embd={self.n_embd} must be divisible by "
                             f"n_head={self.n_head}")
        self.ac_mode = ACMode.parse(self.activation_checkpointing)
        params = (12 * self.n_layer * self.n_embd ** 2
                  + (self.vocab_size + self.seq_len) * self.n_embd)
        if params > MAX_PARAMETERS:
            raise ValueError(f"workload.args.n_layer={self.n_layer}, workload.args.n_embd="
                             f"{self.n_embd} and workload.args.vocab_size={self.vocab_size} "
                             f"make a model of {params:.2g} parameters; this workload trains "
                             f"up to {MAX_PARAMETERS:.0g}")


ARGS = GPTArgs
"""The arguments `orchestrator run` checks before Ray starts (orchestrator/workload_args.py)."""


class CausalSelfAttention(nn.Module):
    def __init__(self, a: GPTArgs) -> None:
        super().__init__()
        self.n_head = a.n_head
        self.qkv = nn.Linear(a.n_embd, 3 * a.n_embd)
        self.proj = nn.Linear(a.n_embd, a.n_embd)
        self.dropout = a.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, a: GPTArgs) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(a.n_embd)
        self.attn = CausalSelfAttention(a)
        self.ln2 = nn.LayerNorm(a.n_embd)
        self.mlp = nn.Sequential(nn.Linear(a.n_embd, 4 * a.n_embd), nn.GELU(),
                                 nn.Linear(4 * a.n_embd, a.n_embd), nn.Dropout(a.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, a: GPTArgs) -> None:
        super().__init__()
        self.wte = nn.Embedding(a.vocab_size, a.n_embd)
        self.wpe = nn.Embedding(a.seq_len, a.n_embd)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.ln_f = nn.LayerNorm(a.n_embd)
        self.head = nn.Linear(a.n_embd, a.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def parallelize(model: GPT, a: GPTArgs, device: torch.device) -> nn.Module:
    """Activation checkpointing first, then DDP/FSDP2 (torchtitan's order): the checkpoint
    wrapper must sit inside the FSDP unit so that recomputation happens while that block's
    parameters are gathered."""
    apply_activation_checkpointing(model.blocks, a.ac_mode)
    return wrap_for_parallelism(model, list(model.blocks), a.parallelism, device)


def build(a: GPTArgs, device: torch.device) -> tuple[nn.Module, TrainState]:
    seed_everything(a.seed)
    model = parallelize(GPT(a).to(device), a, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    return model, TrainState(model, optimizer, warmup_cosine(optimizer, a.steps))


def open_data(a: GPTArgs, rank: int, world_size: int) -> TokenSource:
    try:
        dataset = TokenDataset(a.data)
    except DatasetError as e:
        raise ConfigError(f"workload.args.data: {e}") from e
    return TokenSource(dataset, seq_len=a.seq_len, global_batch=a.batch_size, rank=rank,
                       world_size=world_size, seed=a.seed, prefetch=a.data_prefetch,
                       vocab_size=a.vocab_size)


def preflight(args: dict) -> dict:
    """Called by `orchestrator run` before Ray starts: bad arguments and bad data are exit 2
    and one line, not a crash loop inside the workers. Returns the arguments with a relative
    data path made absolute (workers may run in another directory)."""
    a = parse_args(GPTArgs, args)
    if not a.data:
        return args
    source = open_data(a, rank=0, world_size=1)
    try:
        source.dataset.check(checksums=a.data_check == "checksum")
    except DatasetError as e:
        raise ConfigError(f"workload.args.data: {e}") from e
    finally:
        source.close()
    if "://" not in a.data:
        args = {**args, "data": os.path.abspath(os.path.expanduser(a.data))}
    return args


def train(ctx: TrainContext) -> None:
    a = parse_args(GPTArgs, ctx.args)
    model, state = build(a, ctx.device)
    source = open_data(a, ctx.rank, ctx.world_size) if a.data else None
    trace = (os.path.join(a.data_trace, f"rank{ctx.rank}.jsonl") if a.data_trace else None)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if source is None:
            return token_batch(a.seed, state.data_position, a.batch_size, ctx.rank,
                               ctx.world_size, a.seq_len, a.vocab_size)
        batch = source.next_batch()
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"attempt": ctx.attempt, "step": step,
                                    "position": batch.position,
                                    "samples": list(batch.sample_ids)}) + "\n")
        return batch.inputs, batch.targets

    def step_fn(step: int) -> float:
        x, y = next_batch(step)
        loss = model(x.to(ctx.device), y.to(ctx.device))
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        return global_mean(loss)

    try:
        train_loop(ctx, state, a.steps, step_fn, samples_per_step=a.batch_size,
                   extra_state={"data": source} if source is not None else None)
    finally:
        if source is not None:
            source.close()
