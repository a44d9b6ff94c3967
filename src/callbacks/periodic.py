"""Run something every N training steps and once more at the end of fit (never twice for one step).

`at_fit_end=False` skips the end-of-fit run (callbacks whose `every_n_steps=0` should mean off altogether).
:class:`GeneratingCallback` adds what callbacks that make the trained MLLM answer requests share.
"""

from __future__ import annotations

import contextlib
import logging

import lightning as L

log = logging.getLogger(__name__)


class PeriodicCallback(L.Callback):
    def __init__(self, every_n_steps: int, at_fit_end: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.at_fit_end = at_fit_end
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
        if self.at_fit_end:
            self._maybe_run(trainer, pl_module)


class GeneratingCallback(PeriodicCallback):
    """A periodic callback that decodes with the module's MLLM (KV cache, src/pipelines/mllm.py)."""

    what = "generation"  # named in the FSDP2 warning
    _warned_sharded = False

    def can_generate(self, trainer, pl_module) -> bool:
        """The datamodule's builder and the module's tokenizer exist, and the MLLM is not FSDP2-sharded (KV-cached
        decoding calls the LLM below the sharded root, whose parameters stay sharded there): warned once."""
        from src.parallel import is_sharded

        dm = trainer.datamodule
        if dm is None or getattr(dm, "builder", None) is None or getattr(pl_module, "tokenizer", None) is None:
            return False
        if is_sharded(pl_module.mllm):
            if not self._warned_sharded:
                log.warning("%s: skipped under FSDP2 (sharded MLLM); run it from a checkpoint instead", self.what)
                self._warned_sharded = True
            return False
        return True

    @staticmethod
    @contextlib.contextmanager
    def evaluating(pl_module):
        """The module in eval mode for the block, back in its mode after it."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            yield
        finally:
            pl_module.train(was_training)
