"""Every N steps and at the end of fit: decode a fixed validation batch, save a PNG grid, log it.

The stage provides `sample_images(batch, generator) -> {column name: (B, 3, H, W) in [0, 1]}`; each
row of the grid is one sample, each column one entry (e.g. original | reconstruction).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from src.callbacks.periodic import PeriodicCallback


class SampleImagesCallback(PeriodicCallback):
    def __init__(self, output_dir: str, every_n_steps: int = 1000, num_samples: int = 4, seed: int = 0) -> None:
        super().__init__(every_n_steps)
        self.dir = Path(output_dir) / "samples"
        self.num_samples = num_samples
        self.seed = seed
        self._batch = None

    def _fixed_batch(self, trainer) -> dict | None:
        if self._batch is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader() if dm is not None else None
            if not loader:
                loader = dm.train_dataloader() if dm is not None else None
            if not loader:
                return None
            for batch in loader:
                if batch.batch_size:
                    self._batch = batch
                    break
        return self._batch

    @torch.no_grad()
    def make_grid(self, trainer, pl_module) -> torch.Tensor | None:
        batch = self._fixed_batch(trainer)
        if batch is None:
            return None
        batch = batch.head(min(self.num_samples, batch.batch_size))
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        columns = pl_module.sample_images(batch, generator=torch.Generator().manual_seed(self.seed))
        pl_module.train(was_training)
        size = max(c.shape[-1] for c in columns.values())
        cols = [torch.nn.functional.interpolate(c.float(), size=(size, size)) for c in columns.values()]
        rows = torch.stack(cols, dim=1).flatten(0, 1)  # sample-major: one row per sample
        return make_grid(rows, nrow=len(cols), padding=2, pad_value=1.0), list(columns)

    def run(self, trainer, pl_module, step: int) -> None:
        out = self.make_grid(trainer, pl_module)
        if out is None or not trainer.is_global_zero:
            return
        grid, names = out
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.png"
        save_image(grid, path)
        caption = " | ".join(names)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[str(path)], step=step, caption=[caption])
