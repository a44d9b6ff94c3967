"""Image preprocessing shared by every stage: the ViT view (CLIP-normalised) and the VAE view ([-1, 1])."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from src.models.qwen_vit import CLIP_MEAN, CLIP_STD


def vit_view(img: Image.Image, size: int) -> torch.Tensor:
    """Official SEED-X processor: Resize((size, size)) bilinear (no aspect keep), CLIP mean/std."""
    img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


IMAGE_FITS = ("crop", "stretch")


def vae_view(img: Image.Image, size: int, fit: str = "crop") -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The `size` x `size` VAE view: pixels in [-1, 1], SDXL original (h, w) and crop (top, left).

    `crop`: shorter side to `size`, centre crop (centre, not random: an edit pair stays aligned and samples are
    reproducible across resumes). `stretch`: the whole image resized to `size` x `size` with no crop, as the
    official SEED-X edit script prepares its condition image (`image.resize((1024, 1024))`) -- nothing of a
    non-square input is lost, and it matches the MLLM's own view (the whole image stretched to 448).
    """
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit must be one of {IMAGE_FITS}, got {fit!r}")
    original = (img.height, img.width)
    if fit == "stretch":
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.to_tensor(img) * 2 - 1, original, (0, 0)
    img = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    top = max(0, round((img.height - size) / 2))
    left = max(0, round((img.width - size) / 2))
    img = TF.crop(img, top, left, size, size)
    return TF.to_tensor(img) * 2 - 1, original, (top, left)
