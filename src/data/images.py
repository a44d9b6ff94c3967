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


def vae_view(img: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shorter side to `size`, centre crop: pixels in [-1, 1], SDXL original (h, w) and crop (top, left).

    Centre (not random) crop keeps an edit pair aligned and makes samples reproducible across resumes.
    """
    original = (img.height, img.width)
    img = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    top = max(0, round((img.height - size) / 2))
    left = max(0, round((img.width - size) / 2))
    img = TF.crop(img, top, left, size, size)
    return TF.to_tensor(img) * 2 - 1, original, (top, left)
