"""`feature_store_vs_live` for `make bench`: the MLLM step fed stored ViT features against the same step fed
pixels through the frozen ViT.

The store is written by ``data_prep/precompute_features.py`` (MDS shards, ``dtype`` features) for the bench's
experiment at the bench's size; the same training samples are then built twice, from the store and from
pixels, collated into the same batches, and the same training step (loss, backward, AdamW step) is timed on
each side, alternating which side goes first every round. The ratio is samples/s with the store over
samples/s live (the same samples, so it is the live step time over the stored one); > 1 means the store
saves the ViT's share of the step. The data side (building a sample from the store by id vs decoding
and cutting the image into views) is reported beside it, as are the store's bytes per sample.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


def _paired_samples(live, stored, n: int) -> tuple[list[dict], list[dict], float, float]:
    """The first ``n`` training samples good on both sides (same index, so the same record and draw), and
    each side's build rate in samples/s."""
    a, b, t_live, t_store = [], [], 0.0, 0.0
    for i in range(len(live.train_set)):
        t0 = time.perf_counter()
        x = live.train_set[i]
        t1 = time.perf_counter()
        y = stored.train_set[i]
        t2 = time.perf_counter()
        t_live, t_store = t_live + t1 - t0, t_store + t2 - t1
        if "skipped" not in x and "skipped" not in y:
            a.append(x)
            b.append(y)
        if len(a) == n:
            break
    if len(a) < n:
        raise RuntimeError(f"feature_store_vs_live: only {len(a)} good samples on both sides, need {n}")
    built = i + 1
    return a, b, built / t_live, built / t_store


def _step_time(module, optimizer, batch, warmup: int, steps: int) -> float:
    """Median seconds of a training step (loss, backward, optimizer step) on ``batch``."""
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = module.compute_losses(batch, "train")["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def feature_store_vs_live(cfg: DictConfig, experiment: str, overrides: list[str], out: Path, *,
                          rounds: int = 3, steps: int = 3, warmup: int = 1, dtype: str = "bfloat16") -> dict[str, Any]:
    """``cfg``: ``experiment`` + ``overrides`` composed (src.bench.compose_bench_cfg), CPU. Writes the store
    under ``out/store``."""
    import hydra

    from data_prep.precompute_features import main as precompute
    from src.data.features import FeatureStore

    out = Path(out)
    store = out / "store"
    precompute(["--experiment", experiment, "--out", str(store), "--dtype", dtype, "--device", "cpu",
                "--layout", "mds", *overrides])
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.configure_model()
    module.train()
    live = hydra.utils.instantiate(cfg.data, features_dir=None)
    stored = hydra.utils.instantiate(cfg.data, features_dir=str(store))
    live.setup("fit")
    stored.setup("fit")
    a, b, live_rate, store_rate = _paired_samples(live, stored, int(cfg.data.batch_size))
    batches = {"live": live.collator(a), "store": stored.collator(b)}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    times: dict[str, list[float]] = {"live": [], "store": []}
    for r in range(rounds):
        for side in (("live", "store") if r % 2 == 0 else ("store", "live")):
            times[side].append(_step_time(module, optimizer, batches[side], warmup, steps))
    live_s, store_s = statistics.median(times["live"]), statistics.median(times["store"])
    n = len(a)
    stats = FeatureStore(store).stats()
    return {
        "feature_store_vs_live": live_s / store_s,  # = (n / store_s) / (n / live_s)
        "feature_store_samples_per_s": n / store_s,
        "feature_live_samples_per_s": n / live_s,
        "feature_store_data_samples_per_s": store_rate,
        "feature_live_data_samples_per_s": live_rate,
        "feature_store_bytes_per_sample": stats["bytes_per_sample"],
        "feature_store_dtype": dtype,
        "feature_store_batch_size": n,
    }
