"""Run something every N training steps and once more at the end of fit (never twice for one step)."""

from __future__ import annotations

import lightning as L


class PeriodicCallback(L.Callback):
    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def run(self, trainer, pl_module, step: int) -> None:
        raise NotImplementedError

    def _maybe_run(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._maybe_run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._maybe_run(trainer, pl_module)
