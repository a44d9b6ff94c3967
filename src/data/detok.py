"""Data for both de-tokenizer stages, from any record source (jsonl, image folder, webdataset shards).

A record gives a *target* image (the generated image of an edit triplet, else the record's first image)
and, for edit triplets, a *condition* image (the first non-generated image). Bad samples never raise:
they come back as `{"skipped": SkippedSample}` and the collate moves them to `batch.skipped` (a
:class:`~src.data.batch.DetokBatch`), where
BadSampleLogger counts and reports them.

With ``features_dir`` (a de-tokenizer store of ``data_prep/precompute_features.py``, layout in
``src/data/features.py``) no image is decoded: a sample carries ``vit_features`` (T, D) (the frozen ViT's
output for the target view; the stage pools it), ``vae_moments`` (2C, h, w) (the VAE posterior of the
target; the stage samples from it) and, for stage 2, ``cond_vae_moments``, in place of ``vit_pixels`` /
``vae_pixels`` / ``cond_pixels``. Missing or broken entries are skipped like bad images.

Map-style training data (jsonl / folder sources) is drawn through a one-source :class:`MixtureSampler`,
i.e. a permutation seeded from ``(seed, epoch)`` (in order with ``shuffle: false``), each rank its strided
share, resumable at the exact global position (``src/data/position.py``). Webdataset shards stream
(split by webdataset across nodes and workers) and restart their epoch on resume; for exact resume write
them to a stream dir (``data_prep/write_stream.py``) and train with ``stream_dir`` (``src/data/stream.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset

from src.data.batch import Batch, DetokBatch
from src.data.images import IMAGE_FITS, vae_view, vit_view
from src.data.mixture import MixtureSampler
from src.data.position import ResumableDataModule
from src.data.records import (
    BadSample,
    SkippedSample,
    check_image_size,
    load_image,
    read_shards,
    record_images,
)
from src.data.sources import RecordDataset, SourceConfig, parse_sources, read_source, require_exists
from src.data.stream import StreamSettings
from src.utils.constraints import ConfigModel, NonNegativeInt, PositiveFloat, PositiveInt, StreamDir


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

    def __init__(self, vit_size: int, vae_size: int, min_size: int = 8, max_aspect_ratio: float = 8.0,
                 features=None, fit: str = "crop"):
        if fit not in IMAGE_FITS:
            raise ValueError(f"data.image_fit must be one of {IMAGE_FITS}, got {fit!r}")
        self.vit_size = vit_size
        self.vae_size = vae_size
        self.fit = fit  # how target and condition become the square VAE view (src/data/images.py vae_view)
        self.min_size = min_size
        self.max_aspect_ratio = max_aspect_ratio
        self.features = features  # a src.data.features.FeatureStore, or None: pixels

    def __call__(self, record: dict | SkippedSample) -> dict[str, Any]:
        if isinstance(record, SkippedSample):
            return {"skipped": record}
        try:
            target_item, cond_item = split_target_condition(record)
            if self.features is not None:
                return self._from_features(record, target_item, cond_item)
            target = self._load(record, target_item)
            cond = self._load(record, cond_item) if cond_item is not None else None
        except BadSample as e:
            return {
                "skipped": SkippedSample(
                    e.reason, record.get("source", "?"), record.get("id", "?"), record.get("_where", "?"), e.detail
                )
            }
        views = self.image_views(target)
        sample = {
            "id": record["id"],
            "source": record["source"],
            "vit_pixels": views["vit_pixels"],
            "vae_pixels": views["vae_pixels"],
            "original_size": torch.tensor(views["original_size"]),
            "crop_top_left": torch.tensor(views["crop_top_left"]),
            "has_cond": torch.tensor(cond is not None),
            "cond_pixels": (self.image_views(cond)["vae_pixels"] if cond is not None
                            else torch.zeros_like(views["vae_pixels"])),
        }
        return sample

    def image_views(self, img) -> dict[str, Any]:
        """The ViT view and the VAE view (+ SDXL original size, crop) of one image (also what
        data_prep/precompute_features.py encodes)."""
        vae_pixels, original, crop = vae_view(img, self.vae_size, self.fit)
        return {"vit_pixels": vit_view(img, self.vit_size), "vae_pixels": vae_pixels,
                "original_size": original, "crop_top_left": crop}

    def _from_features(self, record: dict, target_item: dict, cond_item: dict | None) -> dict[str, Any]:
        feats = self.features.load(record)
        index = {id(it): k for k, it in enumerate(record_images(record))}
        t, c = index[id(target_item)], (index[id(cond_item)] if cond_item is not None else None)
        for k, item in ((t, target_item), (c, cond_item)):
            if k is not None:
                check_image_size(*feats.size(k), f"image {item['image']!r}", self.min_size, self.max_aspect_ratio)
        meta = feats.image(t)
        vae = feats.vae(t)
        return {
            "id": record["id"],
            "source": record["source"],
            "vit_features": feats.gen(t),
            "vae_moments": vae,
            "original_size": torch.tensor(meta["original_size"]),
            "crop_top_left": torch.tensor(meta["crop_top_left"]),
            "has_cond": torch.tensor(c is not None),
            "cond_vae_moments": feats.vae(c) if c is not None else torch.zeros_like(vae),
        }

    def _load(self, record: dict, item: dict):
        return load_image(record, item, min_size=self.min_size, max_aspect_ratio=self.max_aspect_ratio)


class ShardDataset(IterableDataset):
    """Streams webdataset shards (split across nodes and workers by webdataset)."""

    def __init__(self, urls: str | list[str], source: str | None, build: DetokSampleBuilder, shuffle: bool) -> None:
        self.urls, self.source, self.build, self.shuffle = urls, source, build, shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in read_shards(self.urls, source=self.source, shuffle=self.shuffle):
            yield self.build(record)


def collate_samples(samples: list[dict[str, Any]], batch_type: type[Batch] = DetokBatch) -> Batch:
    """Samples -> a ``batch_type`` (:class:`~src.data.batch.DetokBatch`; tensors stacked, other values
    listed; skipped samples in ``skipped``)."""
    good = [s for s in samples if "skipped" not in s]
    fields: dict[str, Any] = {}
    for key in good[0] if good else ():
        if key in ("id", "source"):
            continue
        values = [s[key] for s in good]
        fields[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch_type(ids=[s["id"] for s in good], sources=[s["source"] for s in good], batch_size=len(good),
                      skipped=[s["skipped"] for s in samples if "skipped" in s], **fields)


class DetokDataConfig(ConfigModel):
    """The `data` node of the de-tokenizer stages (validated before a run by src/utils/config.py)."""

    train_sources: list[dict]
    val_sources: list[dict] | None = None
    vit_image_size: PositiveInt = 448
    resolution: PositiveInt = 1024
    batch_size: PositiveInt = 4
    val_batch_size: PositiveInt | None = None
    num_workers: NonNegativeInt = 0
    shuffle: bool = True
    min_image_size: PositiveInt = 8
    max_aspect_ratio: PositiveFloat = 8.0
    val_max_samples: PositiveInt | None = None
    seed: int = 0
    features_dir: str | None = None
    stream_dir: StreamDir = None
    stream_cache_dir: str | None = None
    stream_canonical_nodes: PositiveInt = 1
    image_fit: Literal["crop", "stretch"] = "crop"


class DetokDataModule(ResumableDataModule):
    config_model: ClassVar[type[ConfigModel]] = DetokDataConfig  # the `data` node it takes

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
        seed: int = 0,
        features_dir: str | None = None,
        stream_dir: str | None = None,
        stream_cache_dir: str | None = None,
        stream_canonical_nodes: int = 1,
        image_fit: str = "crop",
    ) -> None:
        super().__init__()
        self.train_sources, self.val_sources = parse_sources(train_sources, val_sources)
        self.stream = StreamSettings.of(stream_dir, stream_cache_dir, stream_canonical_nodes, self.train_sources)
        store = None
        if features_dir:
            from src.data.features import FeatureStore

            store = FeatureStore(features_dir, expect={
                "kind": "detok", "vit_image_size": vit_image_size, "resolution": resolution, "image_fit": image_fit})
        self.features_dir = features_dir
        self.build = DetokSampleBuilder(vit_image_size, resolution, min_image_size, max_aspect_ratio, store,
                                        fit=image_fit)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.val_max_samples = val_max_samples
        self.seed = seed

    def _dataset(self, sources: list[SourceConfig], shuffle: bool, limit: int | None = None):
        for s in sources:
            require_exists(s)
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
        if self.stream:  # every stream once an epoch, in the library's order (src/data/stream.py)
            if self.train_sampler is None:
                self.train_set = self.open_train_stream(self.stream, self.train_sources, self.build,
                                                        weighted=False, shuffle=self.shuffle)
        else:
            self.train_set = self._dataset(self.train_sources, self.shuffle)
        self.val_set = (
            self._dataset(self.val_sources, False, self.val_max_samples) if self.val_sources else None
        )
        if self.stream:
            return
        if isinstance(self.train_set, IterableDataset):
            self.train_sampler = None
        elif self.train_sampler is None or self.train_sampler.sizes != [len(self.train_set)]:
            n = len(self.train_set)
            self.train_sampler = MixtureSampler([n], [1.0], num_samples=n, seed=self.seed, shuffle=self.shuffle)

    def collate_fn(self):
        return collate_samples

    def train_dataloader(self) -> DataLoader:
        if self.train_sampler is None:  # streamed shards: no sampler, no position
            return self._loader(self.train_set, self.batch_size, generator=self.fixed_generator())
        return self.train_loader(self.train_set, self.batch_size)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, generator=self.fixed_generator())

