"""Qwen-VL 2-D cross-attention resampler (official SEED-X `qwen_visual.Resampler`).

Used as the ViT `attn_pool` and as the MLLM input/output resamplers. Also holds the small
checkpoint helpers shared by the official-weight loaders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) fp32 table; rows in raster order.

    Channels [0, D/2) encode the column and [D/2, D) the row (the official code calls the
    column half `emb_h`); each half is [sin(p*w), cos(p*w)] with w_i = 10000^(-i/(D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    omega = torch.arange(embed_dim // 4, dtype=torch.float32) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega
    pos = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def one_d(p: torch.Tensor) -> torch.Tensor:
        out = torch.outer(p.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1)


def interpolate_pos_embed(pos: torch.Tensor, target_len: int) -> torch.Tensor:
    """Bicubically resize a square (L, C) table to (target_len, C), like official `get_abs_pos`."""
    src, tgt = int(math.sqrt(pos.size(0))), int(math.sqrt(target_len))
    if src == tgt:
        return pos
    # fp32 because bicubic on half precision is lossy (and unsupported on some backends).
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


@dataclass
class ResamplerConfig:
    """There are two full-size resamplers, so the sizes are required; see the classmethods."""

    grid_size: int
    embed_dim: int
    num_heads: int
    kv_dim: int | None = None
    ln_eps: float = 1e-5

    def __post_init__(self):
        for name in ("grid_size", "embed_dim", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 (2-D sincos), got {self.embed_dim}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.kv_dim is not None and self.kv_dim <= 0:
            raise ValueError(f"kv_dim must be positive or None, got {self.kv_dim}")
        if self.ln_eps <= 0:
            raise ValueError(f"ln_eps must be positive, got {self.ln_eps}")

    @property
    def num_queries(self) -> int:
        return self.grid_size**2

    @classmethod
    def input_resampler(cls) -> ResamplerConfig:
        return cls(grid_size=8, embed_dim=5120, num_heads=32, kv_dim=4096)

    @classmethod
    def output_resampler(cls) -> ResamplerConfig:
        return cls(grid_size=8, embed_dim=4096, num_heads=32, kv_dim=5120)

    @classmethod
    def tiny(cls) -> ResamplerConfig:
        # kv_dim != embed_dim so kv_proj exists, as in the full-size resamplers.
        return cls(grid_size=2, embed_dim=32, num_heads=4, kv_dim=48)


class QwenResampler(nn.Module):
    """grid_size**2 learnable queries cross-attend once to the input tokens."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        d, q = cfg.embed_dim, cfg.num_queries
        # Frozen, but a Parameter so it stays in the state dict like the official checkpoints.
        self.pos_embed = nn.Parameter(torch.empty(q, d), requires_grad=False)
        self.query = nn.Parameter(torch.empty(q, d))
        has_proj = cfg.kv_dim is not None and cfg.kv_dim != d
        self.kv_proj = nn.Linear(cfg.kv_dim, d, bias=False) if has_proj else nn.Identity()
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ln_kv = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        self.pos_embed.copy_(get_2d_sincos_pos_embed(cfg.embed_dim, cfg.grid_size))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn._reset_parameters()  # xavier in_proj, zero biases (nn.MultiheadAttention default)
        for lin in (self.kv_proj, self.attn.out_proj):
            if isinstance(lin, nn.Linear):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        self.ln_q.reset_parameters()
        self.ln_kv.reset_parameters()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, kv_dim) with N a square number -> (B, grid_size**2, embed_dim)."""
        pos_k = interpolate_pos_embed(self.pos_embed, x.size(1))
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.size(0), -1, -1)
        # Keys carry position, values do not (official semantics).
        return self.attn(q, kv + pos_k, kv, attn_mask=attn_mask, need_weights=False)[0]
