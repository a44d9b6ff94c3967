"""Exact, world-size independent data position for training: a base class for our LightningDataModules.

The training loader draws from a :class:`~src.data.mixture.MixtureSampler` (in-memory jsonl / folder
sources) or streams from ``data.stream_dir`` (:meth:`ResumableDataModule.open_train_stream`: the streaming
library owns that order, and a :class:`~src.data.stream.StreamOrder` stands in for the sampler here, so the
position below is counted the same way and handed to the library), made distributed here (rank and
world size from the trainer; ``trainer.use_distributed_sampler`` is off, because Lightning's
``DistributedSampler`` wrapping cannot start mid-epoch nor remap a position to another world size).

The position is ``(epoch, consumed)``: the *data* epoch and ``consumed`` counted in *global* samples of that
epoch's global order. It is what the model consumed, not what the DataLoader (workers, prefetch) already
drew: every training batch that reaches the model (``on_before_batch_transfer`` while training; batches
whose samples were all bad count too: those positions were passed) moves it by ``world_size x samples in
the batch``; when the epoch's share is used up, the next batch starts the next data epoch. Lightning
checkpoints it through the datamodule's public ``state_dict`` / ``load_state_dict``.

The data owns the epoch, Lightning's loop state is never read or edited:

- the training loader (:class:`EpochLoader`) has no length, so Lightning ends its epoch when the data of
  the current data epoch runs out (it pre-fetches one batch to see the end), whatever its own restored
  batch counter says (that counter is in the old run's units after a resume on another world or batch
  size);
- the loader applies the position when its first batch is drawn, not when it is built: strategies that
  restore after setup (FSDP) get the restored position too;
- the sampler's epoch is set from the position at that moment, so Lightning's ``set_epoch`` (its own epoch
  count) does not move the data. A run that *stopped* (``max_steps``, ``should_stop``) is counted by
  Lightning as a finished epoch; resumed, Lightning opens its next epoch and the loader serves the rest of
  the stopped data epoch there: the data and losses are those of an uninterrupted run, and
  ``trainer.current_epoch`` is one ahead of the data epoch from then on (``max_epochs`` counts Lightning's).

RNG: the loader gets its own generator seeded from (seed, epoch, position, rank), so creating an iterator
never draws from the global torch RNG, and DataLoader workers (seeded from that generator by Lightning's
``seed_everything(workers=True)``) are reproducible; per-sample randomness in the data path must not come
from worker RNG at all (builders hash ``(seed, id)`` where they draw).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from src.data.mixture import MixtureSampler
from src.data.stream import StreamOrder, StreamSettings, open_stream

log = logging.getLogger(__name__)

__all__ = ["EpochLoader", "ResumableDataModule", "loader_generator", "planned_steps"]


def loader_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (DataLoader base seed for workers, never global RNG)."""
    seed = int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed % 2**63)


class EpochLoader(DataLoader):
    """The training DataLoader: one iteration is the rest of the current data epoch.

    ``begin`` (the datamodule's) runs when the first batch of an iteration is drawn: it puts the sampler at
    the data position and returns the generator for that iteration. No ``__len__``: Lightning then ends its
    epoch when this iteration ends (see the module docstring); :meth:`ResumableDataModule.batches_per_epoch`
    is the epoch's length for a schedule."""

    def __init__(self, *args, begin: Callable[[], torch.Generator], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._begin = begin

    def __len__(self) -> int:
        raise TypeError("EpochLoader has no length: an epoch ends where its data ends (src/data/position.py)")

    def __iter__(self) -> Iterator[Any]:
        return _LazyIterator(self)

    def _start(self):
        self.generator = self._begin()
        return super().__iter__()


class _LazyIterator:
    def __init__(self, loader: EpochLoader) -> None:
        self._loader, self._it = loader, None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._loader._start()
        return next(self._it)


def planned_steps(trainer) -> int:
    """Optimizer steps the run will take (a schedule's horizon): ``trainer.max_steps``, or ``max_epochs`` whole
    epochs of the datamodule's data when that is fewer (what Lightning's ``estimated_stepping_batches``
    gives, without building the training loader before a checkpoint is restored)."""
    max_steps, max_epochs = int(trainer.max_steps), trainer.max_epochs
    by_epochs = math.inf
    datamodule = getattr(trainer, "datamodule", None)
    if max_epochs is not None and int(max_epochs) >= 0 and isinstance(datamodule, ResumableDataModule):
        batches = datamodule.batches_per_epoch()
        if batches is not None:
            by_epochs = math.ceil(batches / int(trainer.accumulate_grad_batches)) * max(int(max_epochs), 1)
    if max_steps != -1:
        return int(min(max_steps, by_epochs))
    if math.isinf(by_epochs):  # not our datamodule: Lightning's estimate (it builds the training loader)
        return int(trainer.estimated_stepping_batches)
    return int(by_epochs)


class ResumableDataModule(L.LightningDataModule):
    """Subclasses set ``self.train_sampler`` (a MixtureSampler), ``self.batch_size`` and ``self.seed``, and
    build their training loader with :meth:`train_loader`."""

    def __init__(self) -> None:
        super().__init__()
        self.train_sampler: MixtureSampler | StreamOrder | None = None
        self._epoch = 0  # data epoch of the tracked position
        self._start = 0  # global position where this process began consuming that epoch
        self._local = 0  # samples this rank consumed since then
        self._resumed_from: dict | None = None  # state loaded from a checkpoint, until an iteration applies it
        self._stream_started = False  # a streamed set got its start position (later epochs: the library's)
        self._drawn = False  # a training iteration has begun (a position restored after that would be lost)

    # ---- the position ------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def consumed(self) -> int:
        """Global samples of the current epoch the model consumed (on every rank together)."""
        if self.train_sampler is None:
            return 0
        return self.train_sampler.position(self._start, self._local)

    def batches_per_epoch(self) -> int | None:
        """Training batches of one whole data epoch on each rank (None before ``setup``)."""
        if self.train_sampler is None:
            return None
        self.train_sampler.set_distributed(*self._world())
        return -(-self.train_sampler.local_length(0) // int(self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        _, world = self._world()
        state = {"epoch": int(self._epoch), "consumed": int(self.consumed()), "world_size": world,
                 "batch_size": int(self.batch_size)}
        if self.train_sampler is not None:
            state.update(seed=int(self.train_sampler.seed), num_samples=int(self.train_sampler.num_samples))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or "consumed" not in state:
            return  # a checkpoint from before exact resume: start the epoch over
        if self._drawn:
            raise RuntimeError("resume: the training loader drew batches before the checkpoint's data position "
                               "was restored (something iterated it early, e.g. trainer.estimated_stepping_batches "
                               "in configure_optimizers: use src.data.position.planned_steps)")
        self._epoch, self._start, self._local = int(state["epoch"]), int(state["consumed"]), 0
        self._resumed_from = dict(state)
        if self.train_sampler is not None:
            self._check_compatible(state)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        sampler = self.train_sampler
        for key in ("seed", "num_samples"):
            if key in state and int(state[key]) != int(getattr(sampler, key)):
                log.warning("resume: data %s changed (%s -> %s); the data position %d of epoch %d refers to a "
                            "different order now", key, state[key], getattr(sampler, key), state["consumed"],
                            state["epoch"])

    def _roll_over(self) -> None:
        """When this rank's share of the current data epoch is used up, the position is the next epoch's start."""
        sampler = self.train_sampler
        if self._local >= sampler.local_length(self._start):
            self._epoch, self._start, self._local = self._epoch + 1, 0, 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.training and self.train_sampler is not None:
            self.train_sampler.set_distributed(*self._world())
            self._roll_over()  # the first batch of a new data epoch
            self._local += self.batch_size  # position() clamps the (smaller) last batch of an epoch
        return batch

    # ---- the loader --------------------------------------------------------------------------------
    def _begin_iteration(self) -> torch.Generator:
        """Put the sampler at the position (an iteration is the rest of the current data epoch); the
        generator of this iteration. Runs when the iteration's first batch is drawn."""
        sampler = self.train_sampler
        rank, world = self._world()
        sampler.set_distributed(rank, world)
        if self._resumed_from is not None:
            self._check_compatible(self._resumed_from)
            if self._resumed_from.get("world_size") not in (None, world) or \
                    self._resumed_from.get("batch_size") not in (None, int(self.batch_size)):
                log.info("resume: data position %d of epoch %d was written with world size %s, batch size %s; "
                         "going on with %d and %d", self._start, self._epoch, self._resumed_from.get("world_size"),
                         self._resumed_from.get("batch_size"), world, int(self.batch_size))
        # begin where the model stopped consuming: the rest of this epoch, or the next epoch's start
        self._start, self._local = self.consumed(), 0
        self._roll_over()
        sampler.load_state_dict({"epoch": self._epoch, "consumed": self._start})
        if isinstance(sampler, StreamOrder) and (self._resumed_from is not None or not self._stream_started):
            sampler.apply()  # a streamed set: the library starts there itself, then counts its epochs
            self._stream_started = True
        self._resumed_from = None
        self._drawn = True
        return loader_generator(self.seed, self._epoch, self._start, rank)

    def train_loader(self, dataset, batch_size: int) -> EpochLoader:
        """The training DataLoader (sampler: the position's; the library's order for a streamed set)."""
        assert self.train_sampler is not None, "setup() must create self.train_sampler first"
        sampler = None if isinstance(self.train_sampler, StreamOrder) else self.train_sampler
        return EpochLoader(dataset, begin=self._begin_iteration, **self._loader_kwargs(batch_size, sampler))

    def open_train_stream(self, stream: StreamSettings, sources: list, build, *, weighted: bool,
                          epoch_size: int | None = None, shuffle: bool = True, draws: bool = False):
        """The streamed training set of ``sources`` (one stream each under ``stream.dir``, see
        ``src/data/stream.py``); sets ``self.train_sampler`` to its :class:`StreamOrder`. ``weighted``: the
        sources' weights become stream proportions (else every stream once an epoch)."""
        from src.data.sources import source_name

        trainer = self._trainer_or_none()
        world = None
        if trainer is not None:
            world = (int(trainer.global_rank), int(trainer.world_size), int(trainer.local_rank),
                     int(getattr(trainer, "num_devices", 1) or 1))
        dataset, self.train_sampler = open_stream(
            stream.dir, [source_name(s) for s in sources], build, seed=self.seed, batch_size=int(self.batch_size),
            weights=[s.weight for s in sources] if weighted else None, epoch_size=epoch_size, shuffle=shuffle,
            cache_dir=stream.cache_dir, num_canonical_nodes=stream.num_canonical_nodes, world=world, draws=draws)
        return dataset

    def collate_fn(self):
        """The batch collate function (a plain callable, so DataLoader workers never pickle the datamodule)."""
        raise NotImplementedError

    def _loader_kwargs(self, batch_size: int, sampler=None) -> dict[str, Any]:
        return {"batch_size": batch_size, "sampler": sampler,
                "shuffle": False,  # order comes from the sampler (training) or the dataset (validation, shards)
                "num_workers": self.num_workers, "collate_fn": self.collate_fn(),
                "persistent_workers": self.num_workers > 0}

    def _loader(self, dataset, batch_size: int, sampler=None, generator=None) -> DataLoader:
        return DataLoader(dataset, generator=generator, **self._loader_kwargs(batch_size, sampler))

    def fixed_generator(self) -> torch.Generator:
        """For loaders without a position (validation, streamed shards): never draw from the global RNG."""
        return loader_generator(self.seed, -1)
