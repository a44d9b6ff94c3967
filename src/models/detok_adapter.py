"""SEED-X de-tokenizer adapter: official `ResamplerXLV2` (ViT embeds -> SDXL text conditioning).

State-dict keys match the released checkpoints once their `resampler.` prefix is stripped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.utils.weights import load_state_dict_file, load_state_dict_strict


@dataclass
class DetokAdapterConfig:
    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 16
    num_queries: int = 64
    embedding_dim: int = 4096
    output1_dim: int = 768  # SDXL text encoder 1 (CLIP-L) width
    output2_dim: int = 1280  # SDXL text encoder 2 (OpenCLIP-G) width, also the pooled size
    ff_mult: int = 4
    normalize: bool = False
    weights: str | None = None

    def __post_init__(self):
        for name in (
            "dim",
            "depth",
            "dim_head",
            "heads",
            "num_queries",
            "embedding_dim",
            "output1_dim",
            "output2_dim",
            "ff_mult",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            # The pooling attention splits `dim` (not heads*dim_head) over `heads`.
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")

    @property
    def prompt_dim(self) -> int:
        return self.output1_dim + self.output2_dim

    @classmethod
    def tiny(cls, **kw) -> DetokAdapterConfig:
        sizes = {
            "dim": 32,
            "depth": 2,
            "dim_head": 8,
            "heads": 4,
            "num_queries": 8,
            "embedding_dim": 64,
            "output1_dim": 16,
            "output2_dim": 32,
        }
        return cls(**(sizes | kw))


class PerceiverAttention(nn.Module):
    """Latents attend to cat[x, latents]; no biases."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([self.norm1(x), latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # Scaling q and k each by dh^-1/4 (official) keeps fp16 logits in range; softmax in fp32.
        scale = self.dim_head**-0.25
        w = (q * scale) @ (k * scale).transpose(-2, -1)
        w = w.float().softmax(dim=-1).to(w.dtype)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Index-named Sequential so keys are `.0` (LN), `.1`, `.3` like the official checkpoints.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class AttentionPool(nn.Module):
    """CLIP-style AttentionPool2d over the latents: prepend the mean token, attend, keep token 0."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(seq_len + 1, dim))
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, _, d = h.shape
        x = torch.cat([h.mean(dim=1, keepdim=True), h], dim=1) + self.positional_embedding.to(h.dtype)
        # Only token 0 is kept, so only its query is computed (same result as the full attention).
        q, k, v = self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(b, d))


class ResamplerXLV2(nn.Module):
    def __init__(self, cfg: DetokAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.dim))
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.unet_proj_1 = nn.Linear(cfg.dim, cfg.output1_dim)
        self.unet_proj_2 = nn.Linear(cfg.dim, cfg.output2_dim)
        self.unet_attnpool = AttentionPool(cfg.num_queries, cfg.dim, cfg.heads, cfg.output2_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()  # torch defaults, as in the official constructor
        std = self.cfg.dim**-0.5
        nn.init.normal_(self.latents, std=std)
        nn.init.normal_(self.unet_attnpool.positional_embedding, std=std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, embedding_dim) -> prompt_embeds (B, Q, prompt_dim), pooled (B, output2_dim)."""
        if self.cfg.normalize:
            # Official F.normalize default dim=1 normalises over *tokens*; kept for checkpoint parity.
            x = F.normalize(x, dim=1)
        x = self.proj_in(x)
        lat = self.latents.expand(x.size(0), -1, -1)
        for attn, ff in self.layers:
            lat = lat + attn(x, lat)
            lat = lat + ff(lat)
        h = self.norm_out(lat)
        prompt = torch.cat([self.unet_proj_1(h), self.unet_proj_2(h)], dim=-1)
        return prompt, self.unet_attnpool(h)

    def load_official(self, path: str | Path | None = None) -> dict[str, torch.Tensor]:
        """Load an SDXLAdapter checkpoint; returns its `unet.*` tensors (prefix stripped) for the UNet."""
        path = path or self.cfg.weights
        if path is None:
            raise ValueError("no checkpoint path given and cfg.weights is None")
        own, unet = {}, OrderedDict()
        for k, v in load_state_dict_file(path, "model.detokenizer.adapter_weights").items():
            if k.startswith("unet."):
                unet[k[len("unet.") :]] = v
            else:
                own[k.removeprefix("resampler.")] = v
        load_state_dict_strict(self, own, what=f"ResamplerXLV2 ({path})")
        return unet
