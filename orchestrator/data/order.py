"""The global order of samples: which sample each rank takes at each position of the stream.

Pure functions of (seed, epoch, number of samples, position), so the order cannot depend on
the world size, on how far prefetching ran ahead, or on which process computes it:

- the stream position `p` counts samples consumed by the whole gang since the start of the
  run; it is `epoch * num_samples + index`;
- each epoch visits every sample once, in the order of a seeded permutation;
- each step takes the next global batch of B positions, and rank r of W takes positions
  `[p + r*B/W, p + (r+1)*B/W)`, so the union over ranks of a step's samples is the same at any
  world size that divides B.

The permutation is a Feistel network over the next power of two, cycle-walked down to
[0, num_samples): a bijection computed in O(1) memory per sample, for any dataset size, and
defined here rather than by a library's RNG stream, which may change between releases.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class EpochPermutation:
    """A seeded bijection of [0, n) for one epoch: `perm[i]` is the i-th sample of the epoch."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got {n}")
        self.n = n
        bits = max((n - 1).bit_length(), 2)
        self._half = (bits + 1) // 2  # both halves this wide: the domain is 4**half >= n
        self._half_mask = (1 << self._half) - 1
        base = _mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64))
        self._keys = [_mix64(base + r) for r in range(_ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self._half, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
        return (left << self._half) | right

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        # Cycle walking: the network permutes [0, 4**half); applying it again to values
        # that land outside [0, n) stays a bijection of [0, n). Fewer than 4 rounds expected.
        x = self._feistel(i)
        while x >= self.n:
            x = self._feistel(x)
        return x


def rank_slice(position: int, global_batch: int, rank: int, world_size: int) -> range:
    """The stream positions rank `rank` of `world_size` takes from the global batch at
    `position`."""
    if global_batch % world_size:
        raise ValueError(f"workload.args.batch_size={global_batch} (the global batch) must be "
                         f"divisible by the number of workers, {world_size}")
    per_rank = global_batch // world_size
    first = position + rank * per_rank
    return range(first, first + per_rank)


class GlobalOrder:
    """Stream position -> sample id, over epochs of `num_samples` samples."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._epochs: dict[int, EpochPermutation] = {}

    def epoch_of(self, position: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a stream position."""
        return divmod(position, self.num_samples)

    def sample_at(self, position: int) -> int:
        epoch, index = self.epoch_of(position)
        perm = self._epochs.get(epoch)
        if perm is None:
            perm = self._epochs[epoch] = EpochPermutation(self.num_samples, self.seed, epoch)
            if len(self._epochs) > 4:  # a run moves forward: keep the recent epochs only
                del self._epochs[min(self._epochs)]
        return perm[index]

    def rank_samples(self, position: int, global_batch: int, rank: int,
                     world_size: int) -> list[int]:
        return [self.sample_at(p) for p in rank_slice(position, global_batch, rank, world_size)]
