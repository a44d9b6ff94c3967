"""Exact resume of a run that *stopped* (``trainer.max_steps``, ``max_time``, ``should_stop``, SIGTERM).

- Resuming: the data position is the datamodule's (``src/data/position.py``), not Lightning's epoch: a
  checkpoint written after the run stopped mid-epoch (Lightning counts its epoch as ended then) goes on
  with the rest of that data epoch, and the losses match an uninterrupted run.
- SIGTERM (what SLURM sends before preemption or at the time limit): Lightning's signal handler only sets
  a flag; at the next step boundary Lightning raises ``SIGTERMException``. Here, ``on_exception`` then
  writes ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)`` (same path, atomic: the strategy's
  CheckpointIO) unless this step is saved already; ``src.train`` then returns normally (exit code 0).
- End of training: ``last.ckpt`` is refreshed to the final step when the step checkpoints saved earlier
  (Lightning's ModelCheckpoint writes ``last.ckpt`` at the end only if it saved nothing during the run), so
  raising ``trainer.max_steps`` and resuming from it repeats no step.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class ExactResume(L.Callback):
    def __init__(self) -> None:
        self._stepped_to: int | None = None  # global step after the last training batch of this run
        self._saved_at: int | None = None  # global step of the last checkpoint written in this run

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stepped_to = int(trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._saved_at = int(trainer.global_step)  # ModelCheckpoint writes last.ckpt with every save

    # ---- saving on stop ------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        # Nothing saved in this run: ModelCheckpoint's own on_train_end (it runs after this one) writes it.
        if self._saved_at is not None:
            self._save_last(trainer, "end of training")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last(trainer, "SIGTERM")

    def _save_last(self, trainer, why: str) -> None:
        step = int(trainer.global_step)
        if self._stepped_to is None or self._saved_at == step:
            return  # no step in this run (the resumed checkpoint holds this state), or saved already
        paths = sorted({cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
                        for cb in trainer.checkpoint_callbacks
                        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath})
        for path in paths:
            trainer.save_checkpoint(path)  # every rank: sharded strategies write together; atomic
            log.info("%s: saved %s at step %d", why, path, step)
