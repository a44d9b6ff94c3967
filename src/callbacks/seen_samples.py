"""Write the ids of every training batch, per rank: ``<output_dir>/seen_ids/rank{r}.jsonl``.

One line per batch: ``{"step", "epoch", "ids", "skipped"}`` with ``step`` the optimiser step the batch
trains (``global_step`` before it). ``skipped`` lists the ids of bad samples of the batch: their data
position was consumed (they were *seen*, and counted by BadSampleLogger), they just did not train. Off
unless ``enabled`` (``callbacks.seen_samples.enabled=true``). After a crash the file may hold batches past
the checkpoint a run resumes from: keep the lines with ``step < checkpoint global_step``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from src.data.batch import batch_meta


def batch_ids(batch) -> tuple[list[str], list[str]]:
    meta = batch_meta(batch)
    return [str(i) for i in meta.ids], [str(s.id) for s in meta.skipped]


class SeenSamplesLogger(L.Callback):
    def __init__(self, output_dir: str, enabled: bool = False) -> None:
        self.dir = Path(output_dir) / "seen_ids"
        self.enabled = enabled

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.enabled:
            return
        ids, skipped = batch_ids(batch)
        self.dir.mkdir(parents=True, exist_ok=True)
        line = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch), "ids": ids,
                "skipped": skipped}
        with open(self.dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
