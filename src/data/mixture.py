"""Weighted mixture of datasets: a torch ``Sampler`` over a ``ConcatDataset`` of the sources.

For epoch ``e`` source ``k`` gets exactly its share ``num_samples * w_k / sum(w)`` of the positions (rounded
as the streaming library rounds its ``proportion``, :meth:`MixtureSampler.shares`: the in-memory and the
streamed path take the same number of samples of each source an epoch), spread over the epoch by a seeded permutation; source
``k`` is then walked through its own permutation (``offset_k + perm[j]``; in order with
``shuffle=False``), a fresh permutation each time it is exhausted (cycling). Everything is a pure function of
``(seed, epoch)``: this is the *global order* of the epoch, the same on every rank and every resume. One
source with ``num_samples == size`` is a plain seeded permutation (the de-tokenizer's map-style data).

Distributed: with ``set_distributed(rank, world_size)`` rank ``r`` takes the strided share
``order[start + r :: world_size]`` of the global order from the global offset ``start``, the same number
of samples on every rank (the last ``< world_size`` positions of an epoch are left out, never repeated).
So the data position is ``(epoch, consumed)`` with ``consumed`` counted in *global* samples: it does not
depend on the world size, and a position written by 2 processes resumes on 1 (or 4) with no sample
skipped or repeated.

``state_dict()`` holds the epoch and the global position of what this sampler handed out; after
``load_state_dict`` the next iteration continues from there (once), then whole epochs again. (A
DataLoader prefetches, so what a sampler handed out is ahead of what the model consumed: training code
checkpoints the consumed position instead, see ``src/data/position.py``.) A finished pass advances the
epoch by one, so a loop that never calls ``set_epoch`` still sees a new mixture every epoch; calling
``set_epoch(e)`` explicitly always wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["MixtureSampler"]

_SOURCE_STREAM = 0x5EED  # keeps the source draws and the permutations in separate random streams
_PERM_STREAM = 0x9E3


class MixtureSampler(Sampler[int]):
    def __init__(self, sizes: Sequence[int], weights: Sequence[float], num_samples: int, seed: int = 0,
                 names: Sequence[str] | None = None, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, with_draws: bool = False) -> None:
        sizes, weights = list(sizes), list(weights)
        names = list(names) if names is not None else [f"#{k}" for k in range(len(sizes))]
        if not sizes:
            raise ValueError("mixture: needs at least one source")
        if len(weights) != len(sizes) or len(names) != len(sizes):
            raise ValueError(f"mixture: {len(sizes)} sizes but {len(weights)} weights and {len(names)} names")
        for name, size, w in zip(names, sizes, weights):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
                raise ValueError(f"mixture: source {name} has size {size!r}; sizes must be ints >= 0")
            if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(w) or w < 0:
                raise ValueError(f"mixture: source {name} has weight {w!r}; weights must be finite and >= 0")
            if w > 0 and size == 0:
                raise ValueError(f"mixture: source {name} has weight {w} but no samples (size 0); "
                                 f"give it weight 0 or data")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError(f"mixture: all source weights are 0 ({dict(zip(names, weights))})")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
            raise ValueError(f"mixture: num_samples must be an int >= 0, got {num_samples!r}")
        self.sizes = [int(s) for s in sizes]
        self.names = names
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.num_samples = int(num_samples)
        self.seed = int(seed) % 2**63
        self.shuffle = bool(shuffle)
        # yield (index, epoch, global position) instead of the index: which use of a record a draw is
        # (src/data/sources.py DrawnRecords hands it to the sample builder)
        self.with_draws = bool(with_draws)
        self.epoch = 0
        self._start = 0  # global position where the next iteration begins (set by load_state_dict)
        self._consumed = 0  # global position of what was handed out in the current epoch
        self.rank, self.world_size = 0, 1
        self.set_distributed(rank, world_size)

    def set_distributed(self, rank: int, world_size: int) -> None:
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"mixture: rank {rank} is not in a world of {world_size} processes")
        self.rank, self.world_size = rank, world_size

    def local_length(self, start: int = 0) -> int:
        """How many samples each rank draws from global position ``start`` to the end of the epoch."""
        return max(self.num_samples - int(start), 0) // self.world_size

    def position(self, start: int, local_samples: int) -> int:
        """Global position after each rank drew ``local_samples`` of its share from ``start``."""
        return int(start) + self.world_size * min(int(local_samples), self.local_length(start))

    def __len__(self) -> int:
        return self.local_length(0)  # per rank, a whole epoch

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self._consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._consumed = self._start = min(max(int(state.get("consumed", 0)), 0), self.num_samples)

    def shares(self) -> np.ndarray:
        """Positions of each source in an epoch: ``floor(num_samples * p_k)``, the shortfall one each to
        sources drawn without replacement by ``default_rng(seed)``: the streaming library's own rounding
        (``Stream.apply_weights``), so a streamed and an in-memory mixture take the same counts; only sources
        with weight > 0 are drawn (the library would also draw a weight-0 stream)."""
        counts = np.floor(self.probs * self.num_samples).astype(np.int64)
        shortfall = self.num_samples - int(counts.sum())
        if shortfall:
            positive = np.flatnonzero(self.probs > 0)
            if len(positive) == len(self.sizes):  # exactly the library's draw
                picked = np.random.default_rng(self.seed).choice(len(self.sizes), shortfall, False)
            else:
                picked = positive[np.random.default_rng(self.seed).choice(len(positive), shortfall, False)]
            counts[picked] += 1
        return counts

    def indices(self, epoch: int) -> np.ndarray:
        """All ``num_samples`` dataset indices of ``epoch`` (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch, _SOURCE_STREAM])
        choice = rng.permutation(np.repeat(np.arange(len(self.sizes)), self.shares()))
        out = np.empty(self.num_samples, dtype=np.int64)
        for k, size in enumerate(self.sizes):
            where = np.flatnonzero(choice == k)
            if where.size == 0:
                continue
            cycles = -(-where.size // size)
            walk = np.concatenate([
                np.random.default_rng([self.seed, epoch, _PERM_STREAM, k, c]).permutation(size)
                if self.shuffle else np.arange(size)
                for c in range(cycles)
            ])[: where.size]
            out[where] = self.offsets[k] + walk
        return out

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self._start
        self._start = 0
        n, world = self.local_length(start), self.world_size
        mine = self.indices(epoch)[start + self.rank: start + self.rank + n * world: world]
        self._consumed = start
        for i, index in enumerate(mine):
            self._consumed = start + (i + 1) * world
            yield (int(index), epoch, start + i * world + self.rank) if self.with_draws else int(index)
        if self.epoch == epoch:  # a finished pass moves on, unless set_epoch intervened
            self.epoch = epoch + 1
            self._consumed = 0
