"""Qwen-VL ViT-G with attention pooling (official SEED-X `VisionTransformerWithAttnPool`).

State-dict keys match the released `qwen_vit_G.pt`, so its weights load unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.models.resampler import (
    QwenResampler,
    ResamplerConfig,
    interpolate_pos_embed,
)
from src.utils.constraints import ConfigValueError, PositiveFloat, PositiveInt
from src.utils.materialize import TensorSource, empty_init, materialize, random_tower, state_dict_file
from src.utils.weights import (
    RequiredPath,
    load_state_dict_file,
    load_state_dict_strict,
    missing_weights_error,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The official positional table is 16x16 whatever the image size; it is resized per forward.
POS_GRID = 16
_PREFIXES = ("transformer.visual.", "visual.")


@dataclass
class QwenViTConfig:
    width: PositiveInt = 1664
    layers: PositiveInt = 48
    heads: PositiveInt = 16
    mlp_ratio: PositiveFloat = 4.9231
    image_size: PositiveInt = 448
    patch_size: PositiveInt = 14
    output_dim: PositiveInt = 4096
    n_queries: PositiveInt = 256
    ln_eps: PositiveFloat = 1e-6
    gen_pool_kernel: PositiveInt = 4
    # Official attn_pool heads = output_dim // 128; exposed only so the tiny twin can divide.
    pool_head_dim: PositiveInt = 128
    weights: str | None = None

    def __post_init__(self):
        for name in (
            "width",
            "layers",
            "heads",
            "image_size",
            "patch_size",
            "output_dim",
            "n_queries",
            "gen_pool_kernel",
            "pool_head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.ln_eps <= 0:
            raise ValueError(f"mlp_ratio and ln_eps must be positive, got {self.mlp_ratio}, {self.ln_eps}")
        if self.image_size % self.patch_size:
            raise ConfigValueError("patch_size", f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.width % self.heads:
            raise ConfigValueError("heads", f"heads={self.heads} must divide width={self.width}")
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"n_queries must be a square number, got {self.n_queries}")
        if self.output_dim % self.pool_head_dim or self.output_dim % 4:
            raise ValueError(f"output_dim={self.output_dim} must be divisible by pool_head_dim and 4")
        if self.n_queries % self.gen_pool_kernel:
            raise ValueError(f"gen_pool_kernel={self.gen_pool_kernel} must divide n_queries={self.n_queries}")

    def required_paths(self, allow_random_init: bool) -> list[RequiredPath]:
        """What `build_vit` reads; random init (tiny twins) needs nothing."""
        return [RequiredPath("model.vit.weights", "the Qwen-VL ViT state dict (qwen_vit_G.pt)", self.weights,
                             required=not allow_random_init)]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def pool(self) -> ResamplerConfig:
        return ResamplerConfig(
            grid_size=math.isqrt(self.n_queries),
            embed_dim=self.output_dim,
            num_heads=self.output_dim // self.pool_head_dim,
            kv_dim=self.width,
            ln_eps=self.ln_eps,
        )

    @classmethod
    def tiny(cls, **kw) -> QwenViTConfig:
        sizes = {
            "width": 32,
            "layers": 2,
            "heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "output_dim": 64,
            "n_queries": 16,
            "pool_head_dim": 32,
        }
        return cls(**(sizes | kw))


class VisualAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # Official layout: in_proj output is (heads, [q|k|v]) per head, not nn.MultiheadAttention's [Q;K;V].
        q, k, v = self.in_proj(x).view(b, n, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisualAttentionBlock(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(cfg.width, cfg.mlp_width),
                gelu=nn.GELU(),  # exact erf GELU
                c_proj=nn.Linear(cfg.mlp_width, cfg.width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    """Only a container, so that keys read `transformer.resblocks.{i}.*`."""

    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


class QwenViT(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(POS_GRID**2, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.transformer = TransformerBlock(cfg)
        self.attn_pool = QwenResampler(cfg.pool)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()  # torch defaults, as in the official constructor
        self.attn_pool.init_weights()  # the resampler has its own (trunc-normal) scheme
        nn.init.normal_(self.positional_embedding, std=self.cfg.width**-0.5)
        nn.init.normal_(self.proj, std=self.cfg.output_dim**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, H, W), CLIP-normalised -> (B, n_queries, output_dim)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # raster-order tokens
        x = x + interpolate_pos_embed(self.positional_embedding, x.size(1))
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj  # right-multiply, no transpose (official)

    def pool_for_generation(self, feats: torch.Tensor) -> torch.Tensor:
        """Average consecutive raster tokens (1xk strips, not 2x2): (B, 256, D) -> (B, 64, D)."""
        k = self.cfg.gen_pool_kernel
        return F.avg_pool1d(feats.transpose(1, 2), kernel_size=k, stride=k).transpose(1, 2)

    def load_official(self, path: str | Path | None = None) -> None:
        """Load a Qwen-VL visual state dict (.pt/.bin/.safetensors), optionally key-prefixed."""
        path = path or self.cfg.weights
        if path is None:
            raise ValueError("no checkpoint path given and cfg.weights is None")
        sd = {_strip_prefix(k): v for k, v in load_state_dict_file(path, "model.vit.weights").items()}
        load_state_dict_strict(self, sd, what=f"QwenViT ({path})")


def _strip_prefix(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def vit_weight_sources(cfg: QwenViTConfig, allow_random_init: bool, seed: int) -> dict[str, TensorSource]:
    """What `materialize` fills a meta-built QwenViT with: `model.vit.weights` (memory-mapped, each rank reads
    only its shards) or, for tiny twins, the random init drawn under the "vit" tower seed."""
    if cfg.weights:
        if not Path(cfg.weights).exists():
            raise missing_weights_error("model.vit.weights", "the Qwen-VL ViT state dict (qwen_vit_G.pt)", cfg.weights)
        return {_strip_prefix(k): v for k, v in state_dict_file(cfg.weights).items()}
    if not allow_random_init:
        raise missing_weights_error("model.vit.weights", "the Qwen-VL ViT state dict (qwen_vit_G.pt)")
    return random_tower(lambda: QwenViT(cfg), seed, "vit", "")


def build_vit(cfg: QwenViTConfig, allow_random_init: bool, seed: int, device: torch.device | str = "cpu") -> QwenViT:
    """The frozen ViT as every stage builds it (no stage needed: data_prep/precompute_features.py)."""
    with empty_init():
        vit = QwenViT(cfg)
    materialize(vit, vit_weight_sources(cfg, allow_random_init, seed), device, f"QwenViT ({cfg.weights or 'random'})")
    return vit.requires_grad_(False).eval()

