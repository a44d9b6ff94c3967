"""Throughput and MFU every N steps: tokens/s, samples/s, step time, data-wait fraction, peak memory, MFU.

Built on Lightning's `lightning.fabric.utilities.throughput.Throughput` (rates over a window, MFU from an
available-FLOPs figure); Lightning's own `ThroughputMonitor` callback is not used as is because it reads a
fixed `flops_per_batch` attribute, syncs CUDA every step and has no data-wait or memory figures.

The stage supplies what depends on the model: `tokens_of(batch)` (non-pad tokens) and
`flops_per_batch(batch)` (analytic model FLOPs of one step, src/utils/flops.py; may be a device tensor,
summed on the device and read once per log). Logged keys (rank 0, every `log_every_n_steps` optimizer
steps and once at the end of training):

    perf/step_time_s          wall time per training batch over the window (validation excluded)
    perf/samples_per_s        samples (and tokens: non-pad) per second, all ranks (rank 0 x world size)
    perf/tokens_per_s
    perf/data_wait_fraction   time between on_train_batch_end and the next on_train_batch_start over the
                              step time: fetching + collating + moving the batch, plus what other callbacks
                              and loggers do after the step (checkpoints, probes)
    perf/peak_mem_gb          CUDA max_memory_allocated (1e9 bytes); on CPU the process's peak RSS
    perf/model_tflops_per_s   achieved model FLOP/s of one device (when the stage models its FLOPs)
    perf/mfu                  model FLOPs per step / step time / device peak: the dense bf16 peak from
                              src/utils/flops.py by GPU name (Lightning's table for other GPUs/dtypes), or
                              `peak_flops` when given; absent on CPU unless `peak_flops` is set

On CUDA the clock is synchronised only at logging steps, so intermediate steps overlap as usual; the
data-wait figure is host-side time (with a CUDA queue ahead of it, waiting on data need not idle the GPU).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput

from src.utils.flops import device_peak_flops


def compute_dtype(precision: str | int | None) -> torch.dtype:
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    if "16" in p and "32" not in p:
        return torch.float16
    if "64" in p:
        return torch.float64
    return torch.float32


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


class ThroughputMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 50, peak_flops: float | None = None, prefix: str = "perf/") -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"callbacks.throughput.log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self.prefix = prefix
        self.available_flops: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._throughput: Throughput | None = None
        self._t0 = 0.0
        self._excluded = 0.0  # validation time, taken off the clock
        self._val_start: float | None = None
        self._prev_end: float | None = None
        self._excluded_at_prev_end = 0.0
        self._batches = self._samples = self._tokens = 0
        self._samples_at_update = 0
        self._has_tokens = True
        self._flops: Any = 0.0
        self._has_flops = True
        self._window_wait = 0.0
        self._window_start_time = 0.0
        self._window_batches = 0
        self._last_logged_step = -1

    # ---- clock ----------------------------------------------------------------------------------------
    def _now(self, trainer, sync: bool = False) -> float:
        if sync and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _elapsed(self, now: float) -> float:
        return now - self._t0 - self._excluded

    # ---- hooks ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self._reset_counters()
        peak = self.peak_flops
        if peak is None:
            peak = device_peak_flops(trainer.strategy.root_device, compute_dtype(trainer.precision))
        self.available_flops = float(peak) if peak else None
        self._throughput = Throughput(available_flops=self.available_flops, world_size=trainer.world_size,
                                      window_size=2)
        self._t0 = self._now(trainer, sync=True)
        self._prev_end = self._t0
        # The window's left edge: Lightning's Throughput computes rates between its two latest updates.
        self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._throughput is None:
            return
        now = time.perf_counter()
        if self._prev_end is not None:
            self._window_wait += (now - self._prev_end) - (self._excluded - self._excluded_at_prev_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._throughput is None:
            return
        samples = int(pl_module.batch_size_of(batch)) if hasattr(pl_module, "batch_size_of") else 0
        # Throughput needs samples >= batches: a batch whose samples were all skipped is step time, not a batch.
        self._batches += 1 if samples else 0
        self._window_batches += 1
        self._samples += samples
        tokens = pl_module.tokens_of(batch) if hasattr(pl_module, "tokens_of") else None
        if tokens is None:
            self._has_tokens = False  # for the rest of the run: Throughput's windows must stay aligned
        else:
            self._tokens += int(tokens)
        flops = pl_module.flops_per_batch(batch) if hasattr(pl_module, "flops_per_batch") else None
        if flops is None:
            self._has_flops = False
        elif self._has_flops:
            self._flops = self._flops + (flops.detach() if isinstance(flops, torch.Tensor) else float(flops))
        # global_step counts optimizer steps: under gradient accumulation the first batch that reaches a
        # multiple of N is the one that stepped, and later batches of the same step are skipped.
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._log(trainer, pl_module, step)
        self._prev_end = time.perf_counter()
        self._excluded_at_prev_end = self._excluded

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._val_start = self._now(trainer, sync=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._throughput is not None and self._val_start is not None:
            self._excluded += self._now(trainer, sync=True) - self._val_start
            self._val_start = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._throughput is not None and self._window_batches and trainer.global_step != self._last_logged_step:
            self._log(trainer, pl_module, trainer.global_step)

    # ---- compute + log --------------------------------------------------------------------------------
    def compute(self, trainer, pl_module) -> dict[str, float]:
        now = self._now(trainer, sync=True)
        elapsed = self._elapsed(now)
        window_time = elapsed - self._window_start_time
        if self._samples <= self._samples_at_update or window_time <= 0:
            return {}  # nothing consumed in this window (every batch was bad): no rates
        if self._tokens < self._samples:
            self._has_tokens = False
        flops = None
        if self._has_flops:
            flops = float(self._flops)
            self._flops = 0.0
        self._throughput.update(
            time=elapsed, batches=self._batches, samples=self._samples,
            lengths=self._tokens if self._has_tokens else None, flops=flops,
        )
        self._samples_at_update = self._samples
        raw = self._throughput.compute()
        sep, world = "/", trainer.world_size
        out = {
            "step_time_s": window_time / self._window_batches,
            "data_wait_fraction": min(max(self._window_wait / window_time, 0.0), 1.0),
            "samples_per_s": raw.get("samples_per_sec", raw[f"device{sep}samples_per_sec"]),
            "peak_mem_gb": peak_memory_gb(trainer.strategy.root_device),
        }
        if self._has_tokens and f"device{sep}items_per_sec" in raw:
            out["tokens_per_s"] = raw.get("items_per_sec", raw[f"device{sep}items_per_sec"] * world)
        if self._has_flops and f"device{sep}flops_per_sec" in raw:
            out["model_tflops_per_s"] = raw[f"device{sep}flops_per_sec"] / 1e12
            if f"device{sep}mfu" in raw:
                out["mfu"] = raw[f"device{sep}mfu"]
        self._window_start_time = elapsed
        self._window_wait = 0.0
        self._window_batches = 0
        return {self.prefix + k: float(v) for k, v in out.items()}

    def _log(self, trainer, pl_module, step: int) -> None:
        self._last_logged_step = step
        metrics = self.compute(trainer, pl_module)
        if not metrics:
            return
        self.last_metrics = metrics
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)  # -> metrics.json
        # Lightning logs a batch's metrics under the step count *before* its optimizer step: match it.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(step - 1, 0))
