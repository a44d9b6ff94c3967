"""The frozen image encoder of the SEED tokenizers: EVA-CLIP ViT-g/14 at 224 px, as BLIP-2 uses it.

timm's `Eva` architecture built from config (`model.eva_vit`). As in BLIP-2 (LAVIS `create_eva_vit_g`), the
last of EVA-CLIP-g's 40 blocks is dropped (depth 39: the penultimate features) and no final norm is applied;
the tokenizer puts its own `ln_vision` LayerNorm on top. Output: (B, 1 + (224/14)^2 = 257, 1408).

Weights come from a local file (`model.eva_vit.weights`: LAVIS' `eva_vit_g.pth`, an EVA-CLIP / OpenCLIP
`visual.*` state dict or a timm checkpoint; timm's own `checkpoint_filter_fn` maps the layouts). The blocks
past `depth` and any head/final-norm tensors are dropped; every other key must match, else the error names
the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from src.utils.constraints import PositiveInt
from src.utils.materialize import seeded
from src.utils.weights import RequiredPath, check_keys_and_shapes, load_state_dict_file, missing_weights_error

__all__ = ["EvaViTConfig", "build_eva_vit", "load_eva_weights"]


@dataclass
class EvaViTConfig:
    image_size: PositiveInt = 224
    patch_size: PositiveInt = 14
    width: PositiveInt = 1408
    depth: PositiveInt = 39  # EVA-CLIP-g has 40; BLIP-2 / SEED read the 39th block's output
    heads: PositiveInt = 16
    mlp_ratio: float = 6144 / 1408
    weights: str | None = None
    allow_random_init: bool = False  # tiny twins: a seeded random ViT instead of `weights`

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"model.eva_vit.image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"model.eva_vit.width={self.width} must be divisible by heads={self.heads}")

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    def required_paths(self) -> list[RequiredPath]:
        return [RequiredPath("model.eva_vit.weights", "the EVA-CLIP ViT-g state dict (e.g. LAVIS eva_vit_g.pth)",
                             self.weights, required=not self.allow_random_init)]


def _architecture(cfg: EvaViTConfig) -> nn.Module:
    from timm.models.eva import Eva

    vit = Eva(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
              num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="")
    vit.norm = nn.Identity()  # BLIP-2 takes the block output; ln_vision normalises it
    return vit


def load_eva_weights(vit: nn.Module, path: str) -> None:
    from timm.models.eva import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_state_dict_file(path, "model.eva_vit.weights"), vit)
    depth = len(vit.blocks)
    keep = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            if int(k.split(".")[1]) >= depth:
                continue
        elif k.startswith(("norm.", "fc_norm.", "head.", "head_drop.", "rope.")):
            continue
        keep[k] = v
    own = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    check_keys_and_shapes(own, {k: tuple(v.shape) for k, v in keep.items()},
                          f"model.eva_vit.weights ({path}) does not match the EVA ViT:", "checkpoint")
    vit.load_state_dict(keep)


def build_eva_vit(cfg: EvaViTConfig, load_weights: bool, seed: int = 0) -> nn.Module:
    """The frozen EVA ViT: `model.eva_vit.weights`, or (tiny twins, meta builds) the seeded random init of the
    "eva_vit" tower, the same on every rank and every rebuild."""
    with seeded(seed, "eva_vit"):
        vit = _architecture(cfg)
    if load_weights:
        if cfg.weights:
            load_eva_weights(vit, cfg.weights)
        elif not cfg.allow_random_init:
            raise missing_weights_error("model.eva_vit.weights", "the EVA-CLIP ViT-g state dict (eva_vit_g.pth)")
    return vit.requires_grad_(False).eval()


def encode(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels (B, 3, S, S) -> all token features (B, 1 + N, width). Through `forward` (no pooling
    or head with global_pool="" and num_classes=0), so FSDP2 unshards the root parameters around it. Pixels are
    cast to the ViT's dtype (a bf16-held frozen tower)."""
    return vit(pixels.to(next(vit.parameters()).dtype))
