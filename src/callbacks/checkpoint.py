"""Checkpoint callbacks from config: by steps (conf/callbacks/default.yaml `model_checkpoint`) and by time.

Both keep the last k (``save_top_k: k`` with ``monitor: step, mode: max``; -1 keeps all) and refresh
`last.ckpt`; every write is atomic (``src.utils.checkpoint``).
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.callbacks import ModelCheckpoint


def timed_checkpoint(dirpath: str, minutes: float | None = None, keep_last: int = 1,
                     filename: str = "timed_step_{step:07d}") -> ModelCheckpoint | None:
    """A ModelCheckpoint every ``minutes`` of training time (None: no callback at all)."""
    if not minutes:
        return None
    if minutes < 0:
        raise ValueError(f"callbacks.model_checkpoint_time.minutes must be > 0 or null, got {minutes}")
    return ModelCheckpoint(
        dirpath=dirpath, filename=filename, auto_insert_metric_name=False, save_last=True,
        save_top_k=keep_last, monitor="step", mode="max", train_time_interval=timedelta(minutes=minutes),
        enable_version_counter=False,
    )
