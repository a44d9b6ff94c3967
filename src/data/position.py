"""Exact, world-size independent data position for training: a base class for our LightningDataModules.

The training loader draws from a :class:`~src.data.mixture.MixtureSampler` (in-memory jsonl / folder
sources) or streams from ``data.stream_dir`` (:meth:`ResumableDataModule.open_train_stream`: the streaming
library owns that order, and a :class:`~src.data.stream.StreamOrder` stands in for the sampler here, so the
position below is counted the same way and handed to the library), made distributed here (rank and
world size from the trainer; ``trainer.use_distributed_sampler`` is off, because Lightning's
``DistributedSampler`` wrapping cannot start mid-epoch nor remap a position to another world size).

The position is ``(epoch, consumed)``, ``consumed`` counted in *global* samples of the epoch's global order.
It is what the model consumed, not what the DataLoader (workers, prefetch) already drew: every training
batch that reaches the model (``on_before_batch_transfer`` while training; batches whose samples were all
bad count too: those positions were passed) moves it by ``world_size x samples in the batch``. Lightning
checkpoints it through ``state_dict`` / ``load_state_dict`` and restores it before the training loader is
built, so the sampler starts exactly there.

Resuming on another world size or batch size: the sampler maps the global position by itself; Lightning's
per-epoch batch counter (restored in the old run's units) is shifted so that the epoch ends where the data
ends (``_remap_batch_progress``). RNG: the loader gets its own generator seeded from (seed, epoch, position,
rank), so creating an iterator never draws from the global torch RNG, and DataLoader workers (seeded from
that generator by Lightning's ``seed_everything(workers=True)``) are reproducible; per-sample randomness in
the data path must not come from worker RNG at all (builders hash ``(seed, id)`` where they draw).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from src.data.mixture import MixtureSampler
from src.data.stream import StreamOrder, StreamSettings, open_stream

log = logging.getLogger(__name__)

__all__ = ["ResumableDataModule", "loader_generator"]


def loader_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (DataLoader base seed for workers, never global RNG)."""
    seed = int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed % 2**63)


class ResumableDataModule(L.LightningDataModule):
    """Subclasses set ``self.train_sampler`` (a MixtureSampler), ``self.batch_size`` and ``self.seed``, and
    build their training loader with ``self.train_loader_kwargs()``."""

    def __init__(self) -> None:
        super().__init__()
        self.train_sampler: MixtureSampler | StreamOrder | None = None
        self._epoch = 0  # epoch of the tracked position
        self._start = 0  # global position where this process began consuming that epoch
        self._local = 0  # samples this rank consumed since then
        self._resumed_from: dict | None = None  # state loaded from a checkpoint, until the loader applies it

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
        self._epoch, self._start, self._local = int(state["epoch"]), int(state["consumed"]), 0
        self._resumed_from = dict(state)
        if self.train_sampler is not None:
            self._check_compatible(state)
            # Lightning warns that a plain DataLoader cannot resume mid-epoch; this one does.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch",
                                    category=PossibleUserWarning)
        self._drop_early_train_loader()

    def _drop_early_train_loader(self) -> None:
        """Strategies that restore after setup (FSDP, ModelParallel) have built the training loader already
        (``estimated_stepping_batches`` in ``configure_optimizers``) and prefetched from the epoch's start:
        let the fit loop build it again, from the restored position."""
        fit_loop = getattr(self._trainer_or_none(), "fit_loop", None)
        if fit_loop is None or getattr(fit_loop, "_combined_loader", None) is None:
            return
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            fetcher.teardown()
        fit_loop._combined_loader = None

    def _check_compatible(self, state: dict[str, Any]) -> None:
        sampler = self.train_sampler
        for key in ("seed", "num_samples"):
            if key in state and int(state[key]) != int(getattr(sampler, key)):
                log.warning("resume: data %s changed (%s -> %s); the data position %d of epoch %d refers to a "
                            "different order now", key, state[key], getattr(sampler, key), state["consumed"],
                            state["epoch"])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.training and self.train_sampler is not None:
            epoch = int(trainer.current_epoch)
            if epoch != self._epoch:  # a new epoch starts at its beginning
                self._epoch, self._start, self._local = epoch, 0, 0
            self._local += self.batch_size  # position() clamps the (smaller) last batch of an epoch
        return batch

    # ---- the loader --------------------------------------------------------------------------------
    def train_loader_kwargs(self) -> dict[str, Any]:
        """Sampler (distributed, at the resumed position) and generator for the training DataLoader."""
        sampler = self.train_sampler
        assert sampler is not None, "setup() must create self.train_sampler first"
        rank, world = self._world()
        sampler.set_distributed(rank, world)
        if self._resumed_from is not None:
            self._check_compatible(self._resumed_from)
            sampler.load_state_dict({"epoch": self._epoch, "consumed": self._start})
            self._remap_batch_progress(self._resumed_from)
            self._resumed_from = None
        else:
            sampler.set_epoch(self._epoch)
        start = sampler._start
        kwargs = {"generator": loader_generator(self.seed, sampler.epoch, start, rank)}
        if isinstance(sampler, StreamOrder):
            sampler.apply()  # a streamed set: the library starts there itself (no sampler)
        else:
            kwargs["sampler"] = sampler
        return kwargs

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

    def _remap_batch_progress(self, state: dict[str, Any]) -> None:
        """Make Lightning's restored per-epoch batch counter agree with this world and batch size.

        Lightning counts the batches of the current epoch in the old run's units and ends the epoch when
        that count reaches ``len(loader)``. With another world or batch size the old count is not this
        run's: set it to (batches of a whole epoch) - (batches left from the resumed position). All
        counters move by the same amount, so Lightning's restart bookkeeping is unchanged. A no-op when
        neither changed."""
        trainer = self._trainer_or_none()
        if trainer is None or self.train_sampler is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if int(trainer.current_epoch) != self._epoch:
            return
        sampler, bs = self.train_sampler, int(self.batch_size)
        whole = -(-sampler.local_length(0) // bs)
        left = -(-sampler.local_length(self._start) // bs)
        current = epoch_loop.batch_progress.current
        delta = (whole - left) - int(current.ready)
        if delta == 0:
            return
        log.info("resume: data position %d of epoch %d (written with world size %s, batch size %s) is batch "
                 "%d of %d here", self._start, self._epoch, state.get("world_size"), state.get("batch_size"),
                 whole - left, whole)
        for field in ("ready", "started", "processed", "completed"):
            if hasattr(current, field):
                setattr(current, field, max(int(getattr(current, field)) + delta, 0))

    def collate_fn(self):
        """The batch collate function (a plain callable, so DataLoader workers never pickle the datamodule)."""
        raise NotImplementedError

    def _loader(self, dataset, batch_size: int, sampler=None, generator=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,  # order comes from the sampler (training) or the dataset (validation, shards)
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def fixed_generator(self) -> torch.Generator:
        """For loaders without a position (validation, streamed shards): never draw from the global RNG."""
        return loader_generator(self.seed, -1)
