"""Data for both de-tokenizer stages, from any record source (jsonl, image folder, webdataset shards).

A record gives a *target* image (the generated image of an edit triplet, else the record's first image)
and, for edit triplets, a *condition* image (the first non-generated image). Bad samples never raise:
they come back as `{"skipped": SkippedSample}` and the collate moves them to `batch["skipped"]`, where
BadSampleLogger counts and reports them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from src.data.images import vae_view, vit_view
from src.data.records import (
    BadSample,
    SkippedSample,
    load_image,
    read_shards,
    record_images,
)
from src.data.sources import RecordDataset, SourceConfig, read_source


def split_target_condition(record: dict) -> tuple[dict, dict | None]:
    images = record_images(record)
    if not images:
        raise BadSample("no_image", "record has no image item")
    generated = [it for it in images if it.get("generate")]
    if generated:
        inputs = [it for it in images if not it.get("generate")]
        return generated[0], (inputs[0] if inputs else None)
    return images[0], None


class DetokSampleBuilder:
    """Record -> tensors for the de-tokenizer (target ViT view + VAE view, optional condition)."""

    def __init__(self, vit_size: int, vae_size: int, min_size: int = 8, max_aspect_ratio: float = 8.0):
        self.vit_size = vit_size
        self.vae_size = vae_size
        self.min_size = min_size
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, record: dict | SkippedSample) -> dict[str, Any]:
        if isinstance(record, SkippedSample):
            return {"skipped": record}
        try:
            target_item, cond_item = split_target_condition(record)
            target = self._load(record, target_item)
            cond = self._load(record, cond_item) if cond_item is not None else None
        except BadSample as e:
            return {
                "skipped": SkippedSample(
                    e.reason, record.get("source", "?"), record.get("id", "?"), record.get("_where", "?"), e.detail
                )
            }
        vae_pixels, original, crop = vae_view(target, self.vae_size)
        sample = {
            "id": record["id"],
            "source": record["source"],
            "vit_pixels": vit_view(target, self.vit_size),
            "vae_pixels": vae_pixels,
            "original_size": torch.tensor(original),
            "crop_top_left": torch.tensor(crop),
            "has_cond": torch.tensor(cond is not None),
            "cond_pixels": vae_view(cond, self.vae_size)[0] if cond is not None else torch.zeros_like(vae_pixels),
        }
        return sample

    def _load(self, record: dict, item: dict):
        return load_image(record, item, min_size=self.min_size, max_aspect_ratio=self.max_aspect_ratio)


class ShardDataset(IterableDataset):
    """Streams webdataset shards (split across nodes and workers by webdataset)."""

    def __init__(self, urls: str | list[str], source: str | None, build: DetokSampleBuilder, shuffle: bool) -> None:
        self.urls, self.source, self.build, self.shuffle = urls, source, build, shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in read_shards(self.urls, source=self.source, shuffle=self.shuffle):
            yield self.build(record)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {
        "skipped": [s["skipped"] for s in samples if "skipped" in s],
        "batch_size": len(good),
    }
    if not good:
        return batch
    for key in good[0]:
        values = [s[key] for s in good]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class DetokDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_sources: list[dict],
        val_sources: list[dict] | None = None,
        vit_image_size: int = 448,
        resolution: int = 1024,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        min_image_size: int = 8,
        max_aspect_ratio: float = 8.0,
        val_max_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.train_sources = [SourceConfig(**s) for s in train_sources]
        self.val_sources = [SourceConfig(**s) for s in (val_sources or [])]
        if not self.train_sources:
            raise ValueError("data.train_sources is empty: give at least one {path, kind} source")
        self.build = DetokSampleBuilder(vit_image_size, resolution, min_image_size, max_aspect_ratio)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.val_max_samples = val_max_samples

    def _dataset(self, sources: list[SourceConfig], shuffle: bool, limit: int | None = None):
        for s in sources:
            if not Path(s.path).exists():
                raise FileNotFoundError(f"data source path does not exist: {s.path} (kind={s.kind})")
        shards = [s for s in sources if s.kind == "shards"]
        if shards:
            if len(sources) > 1:
                raise ValueError("the de-tokenizer datamodule takes either shard sources or file sources, not both")
            return ShardDataset(shards[0].path, shards[0].name, self.build, shuffle)
        records = [r for s in sources for r in read_source(s)]
        if limit is not None:
            records = [r for r in records if not isinstance(r, SkippedSample)][:limit]
        return RecordDataset(records, self.build)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(self.train_sources, self.shuffle)
        self.val_set = (
            self._dataset(self.val_sources, False, self.val_max_samples) if self.val_sources else None
        )

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and not isinstance(dataset, IterableDataset),
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, self.shuffle)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, False)

