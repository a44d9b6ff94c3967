"""Data for the SEED tokenizer stages: image-caption pairs from any record source -> (224 px view, caption).

The record's image is the one the de-tokenizer would target (its generated image, else its first image,
`split_target_condition`); the caption is all of its text. Stage 1 (BLIP-2 losses) and v1 (SD text targets)
need a caption: a record without one is skipped as ``no_caption`` (`require_caption`); v2 trains on images
alone. The view is CLIP-normalised, what EVA-CLIP and the CLIP-H target encoder both take: for training
(`augment`, the released `blip2_image_train`) RandomResizedCrop(size, scale 0.5-1, ratio 3/4-4/3, bicubic)
and a horizontal flip with probability 0.5; validation and tokenisation use the bilinear Resize(size) of
`vit_view` (what the released scripts' `clip_transform` does). The crop and flip are drawn from a seed of
(data seed, source, record id), so a resumed run and every rank draw the same (unlike the released
loader, a record gets the same crop in every epoch).

Everything else (sources, shards, streams, exact resume, bad-sample accounting, the sampler) is the
de-tokenizer datamodule's.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from pydantic import model_validator
from torchvision.transforms import InterpolationMode

from src.data.batch import SeedTokenizerBatch
from src.data.detok import DetokDataConfig, DetokDataModule, collate_samples, split_target_condition
from src.data.images import CLIP_MEAN, CLIP_STD, vit_view
from src.data.records import BadSample, SkippedSample, load_image, record_text
from src.utils.constraints import ConfigValueError, PositiveInt

__all__ = ["CaptionedImageBuilder", "SeedTokenizerDataModule", "add_dec_token"]

DEC_TOKEN = "[DEC]"  # BLIP-2's decoder start token for captioning


def add_dec_token(tokenizer) -> int:
    """BLIP-2's `[DEC]` (the captioning decoder's first token) as an extra special token; idempotent."""
    if DEC_TOKEN in tokenizer.get_vocab():
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": [DEC_TOKEN]})


CROP_SCALE = (0.5, 1.0)  # released blip2_image_train
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default, which LAVIS keeps


def train_view(img: Image.Image, size: int, seed: int) -> torch.Tensor:
    """The released tokenizer-training view: RandomResizedCrop(size, scale 0.5-1, bicubic) + horizontal flip,
    CLIP mean/std, drawn from `seed` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(img, scale=list(CROP_SCALE), ratio=list(CROP_RATIO))
        flip = bool(torch.rand(()) < 0.5)
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


class CaptionedImageBuilder:
    def __init__(self, image_size: int, require_caption: bool, min_size: int = 8,
                 max_aspect_ratio: float = 8.0, augment_seed: int | None = None) -> None:
        self.augment_seed = augment_seed  # None: the deterministic vit_view (validation)
        self.image_size = image_size
        self.require_caption = require_caption
        self.min_size = min_size
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, record: dict | SkippedSample) -> dict[str, Any]:
        if isinstance(record, SkippedSample):
            return {"skipped": record}
        try:
            item, _ = split_target_condition(record)
            caption = record_text(record, " ").strip()
            if self.require_caption and not caption:
                raise BadSample("no_caption", "record has no text item (stage needs image-caption pairs)")
            img = load_image(record, item, min_size=self.min_size, max_aspect_ratio=self.max_aspect_ratio)
        except BadSample as e:
            return {"skipped": e.to_skipped(record.get("source", "?"), record.get("id", "?"), record.get("_where", "?"))}
        if self.augment_seed is None:
            pixels = vit_view(img, self.image_size)
        else:
            seed = zlib.crc32(f"{self.augment_seed}:{record['source']}:{record['id']}".encode())
            pixels = train_view(img, self.image_size, seed)
        return {"id": record["id"], "source": record["source"], "pixels": pixels, "caption": caption}


class SeedTokenizerDataConfig(DetokDataConfig):
    """The `data` node of the SEED tokenizer stages: the de-tokenizer's, one image size, pixels only."""

    image_size: PositiveInt = 224
    require_caption: bool = True
    augment: bool = True

    @model_validator(mode="after")
    def _pixels_at_one_size(self):
        for key in ("vit_image_size", "resolution"):
            if key in self.model_fields_set:
                raise ConfigValueError(key, f"data.{key}: the SEED tokenizer's one view size is data.image_size")
        if self.features_dir:
            raise ConfigValueError("features_dir", "data.features_dir: the SEED tokenizer stages read pixels; set it "
                                                   "to null")
        return self


class SeedTokenizerDataModule(DetokDataModule):
    """`DetokDataModule` (its sources, shards, streams, batch and worker settings in `**kwargs`) with
    image-caption samples instead of de-tokenizer views."""

    config_model = SeedTokenizerDataConfig

    def __init__(self, train_sources: list[dict], val_sources: list[dict] | None = None,
                 image_size: int = 224, require_caption: bool = True, augment: bool = True, **kwargs) -> None:
        super().__init__(train_sources, val_sources, vit_image_size=image_size, resolution=image_size, **kwargs)
        self.val_build = CaptionedImageBuilder(image_size, require_caption, self.build.min_size,
                                               self.build.max_aspect_ratio)
        self.build = CaptionedImageBuilder(image_size, require_caption, self.build.min_size,
                                           self.build.max_aspect_ratio, int(self.seed) if augment else None)

    def collate_fn(self):
        return functools.partial(collate_samples, batch_type=SeedTokenizerBatch)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.val_set is not None:
            self.val_set.build = self.val_build  # validation: the deterministic view
