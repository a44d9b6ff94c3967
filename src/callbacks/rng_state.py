"""Checkpoint and restore the RNG streams of every rank (python, numpy, torch CPU and CUDA).

Saved in the checkpoint when it is written (one entry per rank, gathered to rank 0); restored right before
the first training batch after a resume, so nothing between restore and training (building loaders,
optimiser setup) can shift the stream. With it, a resumed run draws the same dropout masks, noise and
timesteps as an uninterrupted one. DataLoader workers hold no state worth saving: they are seeded from
the loader's own generator (``src/data/position.py``) and per-sample randomness is hashed from ids.

On another world size, ranks without a saved state are seeded from (their saved stream's seed, step, rank).
Every value is a plain tensor/int/tuple, so checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RNGStateCallback(L.Callback):
    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint is assembled (Trainer.save_checkpoint runs on all ranks).
        return {"ranks": _all_gather(capture_rng())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = list(state.get("ranks") or []) or None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        rank, world = trainer.global_rank, trainer.world_size
        if len(states) == world:
            restore_rng(states[rank])
            return
        restore_rng(states[rank % len(states)])
        seed = int(np.random.SeedSequence([torch.initial_seed() % 2**63, trainer.global_step, rank])
                   .generate_state(1, dtype=np.uint64)[0] % 2**63)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        log.info("resume: RNG states of %d ranks, running on %d: rank %d reseeded", len(states), world, rank)
