"""`TokenSource`: a rank's stream of (input, target) token batches from a prepared dataset,
resumable and reshardable.

    source = TokenSource(TokenDataset(url), seq_len=256, global_batch=32, rank=ctx.rank,
                         world_size=ctx.world_size, seed=0)
    start = ctx.restore({"train": state, "data": source})   # the position is restored too
    batch = source.next_batch()                              # prefetched in the background

A sample is a window of `seq_len + 1` tokens inside one row (chunk) of the dataset: row c
holds `(chunk_tokens - 1) // seq_len` of them. The whole position is (epoch, index, seed), a
few integers saved in the checkpoint beside the model, so a resume (at any world size that
divides the global batch) continues with exactly the next samples (orchestrator/data/order.py).

Prefetching: a background thread builds the next `prefetch` batches while the training step
runs; the step waits only when the reads fall behind (`wait_s` counts how long). The batch at
a position is a pure function of the position, so what ran ahead is never wrong, only
discarded when a restore moves the position.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from orchestrator.data.dataset import RowGroupRef, TokenDataset
from orchestrator.data.order import GlobalOrder, rank_slice
from orchestrator.errors import DatasetError

_CACHED_GROUPS = 32


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    """(rows, seq_len) int64 token ids."""
    targets: torch.Tensor
    """The inputs shifted by one token."""
    position: int
    """Stream position of the global batch this is a slice of."""
    sample_ids: tuple[int, ...]
    """The dataset samples in this rank's slice, in order."""


class TokenSource(Stateful):
    def __init__(self, dataset: TokenDataset, *, seq_len: int, global_batch: int, rank: int,
                 world_size: int, seed: int, prefetch: int = 2, vocab_size: int | None = None) -> None:
        m = dataset.manifest
        if seq_len + 1 > m.chunk_tokens:
            raise DatasetError(f"workload.args.seq_len={seq_len} needs rows of at least "
                               f"{seq_len + 1} tokens; {dataset.url} has rows of "
                               f"{m.chunk_tokens}")
        if vocab_size is not None and vocab_size < m.vocab_size:
            raise DatasetError(f"workload.args.vocab_size={vocab_size} is smaller than the "
                               f"vocabulary of {dataset.url} ({m.vocab_size} tokens); set it "
                               f"to at least {m.vocab_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        rank_slice(0, global_batch, rank, world_size)  # the batch splits evenly, or a clear error
        self.dataset = dataset
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.per_chunk = (m.chunk_tokens - 1) // seq_len
        self.num_samples = dataset.total_rows * self.per_chunk
        self.order = GlobalOrder(self.num_samples, seed)
        self.position = 0
        """Samples the whole gang has consumed since the start of the run."""
        self.wait_s = 0.0
        """Time the caller of next_batch() spent waiting for data, in total."""
        self._prefetch = prefetch
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
                      if prefetch else None)
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._groups: dict[RowGroupRef, np.ndarray] = {}
        self._fingerprint = m.fingerprint()

    # --- the stream -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def sample_ids(self, position: int) -> list[int]:
        return self.order.rank_samples(position, self.global_batch, self.rank, self.world_size)

    def next_batch(self) -> Batch:
        """This rank's slice of the global batch at the current position; advances it."""
        position = self.position
        t0 = time.monotonic()
        if self._pool is None:
            batch = self._build(position)
        else:
            future = self._pending.pop(position, None) or self._pool.submit(self._build, position)
            batch = future.result()
        self.wait_s += time.monotonic() - t0
        self.position = position + self.global_batch
        self._schedule()
        return batch

    def _schedule(self) -> None:
        if self._pool is None:
            return
        for k in range(self._prefetch):
            p = self.position + k * self.global_batch
            if p not in self._pending:
                self._pending[p] = self._pool.submit(self._build, p)

    def _build(self, position: int) -> Batch:
        ids = self.sample_ids(position)
        rows = []
        for sample in ids:
            chunk, window = divmod(sample, self.per_chunk)
            ref, row = self.dataset.locate(chunk)
            start = window * self.seq_len
            rows.append(self._group(ref)[row, start:start + self.seq_len + 1])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], position=position,
                     sample_ids=tuple(ids))

    def _group(self, ref: RowGroupRef) -> np.ndarray:
        rows = self._groups.get(ref)
        if rows is None:
            rows = self.dataset.read_row_group(ref)
            if len(self._groups) >= _CACHED_GROUPS:
                self._groups.pop(next(iter(self._groups)))  # the oldest read
            self._groups[ref] = rows
        return rows

    def close(self) -> None:
        """Stop reading ahead and close the shard files. Waits for a read in progress, so
        that no thread touches the dataset afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
        self.dataset.close()

    # --- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        epoch, index = self.order.epoch_of(self.position)
        # Tensors, not Python ints: nothing but tensors and JSON ever comes back from storage.
        return {"epoch": torch.tensor(epoch), "index": torch.tensor(index),
                "seed": torch.tensor(self.order.seed),
                "num_samples": torch.tensor(self.num_samples),
                "dataset": torch.tensor(self._fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seed, samples, fp = (int(state[k]) for k in ("seed", "num_samples", "dataset"))
        if fp != self._fingerprint:
            raise DatasetError(f"the checkpoint was taken on other data than {self.dataset.url} "
                               "(its dataset fingerprint differs): resuming would read other "
                               "samples; restore without the data position "
                               "(checkpoint.restore_parts: [train]) to start its stream anew")
        if samples != self.num_samples:
            raise DatasetError(f"the checkpoint's data stream has {samples} samples per epoch, "
                               f"this one {self.num_samples}: workload.args.seq_len changed")
        if seed != self.order.seed:
            raise DatasetError(f"the checkpoint's data order has seed {seed}, this run "
                               f"{self.order.seed}: keep workload.args.seed to resume exactly")
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.num_samples or epoch < 0:
            raise DatasetError(f"the checkpoint's data position (epoch {epoch}, index {index}) "
                               f"is outside a stream of {self.num_samples} samples per epoch")
        self.position = epoch * self.num_samples + index
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
