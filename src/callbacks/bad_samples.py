"""Counts, logs and files every skipped sample; stops the run only past a configured bad fraction."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L

from src.data.batch import batch_meta


class TooManyBadSamples(RuntimeError):
    pass


class BadSampleLogger(L.Callback):
    """Reads `batch.skipped` (SkippedSample list) and `batch.batch_size` from every training batch.

    Logs `data/skipped/<reason>` and `data/skipped/total`, appends each to `<output_dir>/bad_samples.jsonl`
    (reason, source, id, where, detail), and raises once at least `min_seen` samples were seen and the
    skipped fraction exceeds `max_bad_fraction`.
    """

    def __init__(self, output_dir: str, max_bad_fraction: float = 0.05, min_seen: int = 100) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"callbacks.bad_samples.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.path = Path(output_dir) / "bad_samples.jsonl"
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.by_reason: Counter[str] = Counter()
        self.by_source: Counter[str] = Counter()
        self.seen = 0

    def state_dict(self) -> dict:
        return {"by_reason": dict(self.by_reason), "by_source": dict(self.by_source), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.by_reason = Counter(state.get("by_reason", {}))
        self.by_source = Counter(state.get("by_source", {}))
        self.seen = int(state.get("seen", 0))

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        meta = batch_meta(batch)
        skipped = meta.skipped
        self.seen += meta.batch_size + len(skipped)
        if skipped:
            self._record(trainer, skipped)
        if self.skipped:
            metrics = {f"data/skipped/{k}": float(v) for k, v in self.by_reason.items()}
            metrics["data/skipped/total"] = float(self.skipped)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, reduce_fx="max", batch_size=1)
        fraction = self.skipped / max(self.seen, 1)
        if self.seen >= self.min_seen and fraction > self.max_bad_fraction:
            raise TooManyBadSamples(
                f"{self.skipped} of {self.seen} samples were bad ({fraction:.1%} > "
                f"callbacks.bad_samples.max_bad_fraction={self.max_bad_fraction}); by reason "
                f"{dict(self.by_reason)}, by source {dict(self.by_source)}. See {self.path}."
            )

    def _record(self, trainer, skipped: list) -> None:
        for s in skipped:
            self.by_reason[s.reason] += 1
            self.by_source[s.source] += 1
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                for s in skipped:
                    f.write(json.dumps(s.to_dict()) + "\n")
