"""Data for the SEED tokenizer stages: image-caption pairs from any record source -> (224 px view, caption).

The record's image is the one the de-tokenizer would target (its generated image, else its first image,
`split_target_condition`); the caption is all of its text. Stage 1 (BLIP-2 losses) and v1 (SD text targets)
need a caption: a record without one is skipped as ``no_caption`` (`require_caption`); v2 trains on images
alone. The view is CLIP-normalised (`vit_view`), what EVA-CLIP and the CLIP-H target encoder both take.

Everything else (sources, shards, streams, exact resume, bad-sample accounting, the sampler) is the
de-tokenizer datamodule's.
"""

from __future__ import annotations

from typing import Any

from src.data.detok import DetokDataModule, split_target_condition
from src.data.images import vit_view
from src.data.records import BadSample, SkippedSample, load_image, record_text
from src.utils.constraints import PositiveInt

__all__ = ["CaptionedImageBuilder", "SeedTokenizerDataModule", "add_dec_token"]

DEC_TOKEN = "[DEC]"  # BLIP-2's decoder start token for captioning


def add_dec_token(tokenizer) -> int:
    """BLIP-2's `[DEC]` (the captioning decoder's first token) as an extra special token; idempotent."""
    if DEC_TOKEN in tokenizer.get_vocab():
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": [DEC_TOKEN]})


class CaptionedImageBuilder:
    def __init__(self, image_size: int, require_caption: bool, min_size: int = 8,
                 max_aspect_ratio: float = 8.0) -> None:
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
        return {"id": record["id"], "source": record["source"], "pixels": vit_view(img, self.image_size),
                "caption": caption}


class SeedTokenizerDataModule(DetokDataModule):
    """`DetokDataModule` (its sources, shards, streams, batch and worker settings in `**kwargs`) with
    image-caption samples instead of de-tokenizer views."""

    def __init__(self, train_sources: list[dict], val_sources: list[dict] | None = None,
                 image_size: PositiveInt = 224, require_caption: bool = True, **kwargs) -> None:
        if kwargs.get("features_dir"):
            raise ValueError("data.features_dir: the SEED tokenizer stages read pixels; set it to null")
        super().__init__(train_sources, val_sources, vit_image_size=image_size, resolution=image_size, **kwargs)
        self.build = CaptionedImageBuilder(image_size, require_caption, self.build.min_size, self.build.max_aspect_ratio)
