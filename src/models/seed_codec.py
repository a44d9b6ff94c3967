"""SEED tokenizer stage 2 as released (AILab-CVC/SEED `Blip2QformerQuantizer`): causal embeddings -> discrete
codes -> reconstructed causal embeddings and the diffusion decoder's conditioning (plain torch).

    causal (B, Q=32, W=768) --encode_task_layer (W->W, Tanh, W->32)--> z (B, Q, 32) --VQ 8192x32--> codes (B, Q)
    codes --codebook--> (B, Q, 32) --decode_task_layer (32->32, Tanh, 32->W)--> d (B, Q, W)
    recon branch:  d + pos_embed       -> 4 pre-LN ViT blocks (`blocks`)       = recon (B, Q, W)
    image branch:  d + pos_embed_image -> 4 pre-LN ViT blocks (`blocks_image`) -> head = gen (B, N, D)

The blocks are timm's ViT `Block` (12 heads, MLP x4, qkv bias, exact GELU, LayerNorm eps 1e-6, no mask) with
the released key names. Heads (`head`):
* `image_down` (default; the released `seed_quantizer.pt`): per query Linear(W,256)-ReLU-Linear(256,128)-ReLU-
  Linear(128,32), all without bias, flattened query-major (query i at [32i, 32i+32)) and `distill_image_proj`
  Linear(Q*32, D): one embedding (N = 1), v2's CLIP-H image embedding (D = 1024).
* `reverse_qformer` (the released training code): N learned `reverse_tokens` read the image branch through a
  bidirectional Q-Former (cross-attention every 2nd layer: 0 and 2 of 4) and `distill_image_proj` Linear(W, D);
  N = 77 x D = 768 serves v1 (SD v1.4 text states).
Parameter names follow the released state dict (`quantize.embedding.weight`, `blocks.0.attn.qkv.weight`, ...),
so `data_prep.convert_seed_tokenizer` maps released weights onto it by prefix.
Losses (stage): VQ, 1 - cosine(recon, causal embedding), MSE of gen to the frozen target encoder's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.models.vq import VectorQuantizer, VQConfig
from src.utils.constraints import PositiveInt

__all__ = ["HEADS", "SeedCodec", "SeedCodecConfig"]

HEADS = ("image_down", "reverse_qformer")
BLOCK_LN_EPS = 1e-6  # the released vit.py Block's LayerNorm


@dataclass
class SeedCodecConfig:
    vq: dict[str, Any] = field(default_factory=dict)
    # the two contextual branches (recon and image), released: 4 blocks each, 12 heads, MLP ratio 4
    decode_depth: PositiveInt = 4
    decode_heads: PositiveInt = 12
    mlp_ratio: float = 4.0
    head: str = "image_down"
    image_down_dims: list[int] = field(default_factory=lambda: [256, 128, 32])
    # head reverse_qformer: a BERT-style Q-Former (released training code: 4 layers, cross-attention every 2nd)
    reverse_qformer_layers: PositiveInt = 4
    reverse_qformer_heads: PositiveInt = 12
    reverse_qformer_intermediate_size: PositiveInt = 3072
    reverse_qformer_cross_attention_frequency: PositiveInt = 2

    def __post_init__(self) -> None:
        self.vq_cfg = VQConfig(**self.vq)
        if self.head not in HEADS:
            raise ValueError(f"model.seed_codec.head={self.head!r} must be one of {HEADS}")
        if not self.image_down_dims or any(int(d) < 1 for d in self.image_down_dims):
            raise ValueError(f"model.seed_codec.image_down_dims={self.image_down_dims} must be positive widths")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.seed_codec.mlp_ratio must be > 0, got {self.mlp_ratio}")

    def check(self, width: int, gen_tokens: int) -> None:
        """Checks against the Q-Former width and the target's token count (before anything is built)."""
        checks = [("decode_heads", self.decode_heads)]
        if self.head == "reverse_qformer":
            checks.append(("reverse_qformer_heads", self.reverse_qformer_heads))
        for key, heads in checks:
            if width % heads:
                raise ValueError(f"model.seed_codec.{key}={heads} must divide the Q-Former width {width}")
        if self.head == "image_down" and gen_tokens != 1:
            raise ValueError(f"model.seed_codec.head=image_down gives one embedding, but the decoder's target has "
                             f"{gen_tokens} tokens: use head=reverse_qformer (e.g. v1's 77 text states)")


def _task_layer(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def _image_down(width: int, dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip([width, *dims[:-1]], dims):
        layers += [nn.Linear(d_in, int(d_out), bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # released indices: Linear at 0, 2, 4; no ReLU after the last


class SeedCodec(nn.Module):
    def __init__(self, cfg: SeedCodecConfig, width: int, num_queries: int, gen_tokens: int, gen_dim: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        cfg.check(width, gen_tokens)
        self.cfg = cfg
        dim = cfg.vq_cfg.dim
        self.encode_task_layer = _task_layer(width, width, dim)
        self.quantize = VectorQuantizer(cfg.vq_cfg)
        self.decode_task_layer = _task_layer(dim, dim, width)  # released hidden width: the code dim, not W

        def branch() -> nn.ModuleList:
            return nn.ModuleList(Block(width, cfg.decode_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                       norm_layer=partial(nn.LayerNorm, eps=BLOCK_LN_EPS))
                                 for _ in range(cfg.decode_depth))

        self.pos_embed = nn.Parameter(torch.zeros(1, num_queries, width))  # zeros, as released
        self.blocks = branch()
        self.pos_embed_image = nn.Parameter(torch.zeros(1, num_queries, width))
        self.blocks_image = branch()
        if cfg.head == "image_down":
            self.image_down = _image_down(width, cfg.image_down_dims)
            self.distill_image_proj = nn.Linear(num_queries * int(cfg.image_down_dims[-1]), gen_dim)
        else:
            from transformers import Blip2QFormerConfig, Blip2QFormerModel

            self.reverse_tokens = nn.Parameter(torch.randn(1, gen_tokens, width) * 0.02)
            self.reverse_qformer = Blip2QFormerModel(Blip2QFormerConfig(
                hidden_size=width, num_hidden_layers=cfg.reverse_qformer_layers,
                num_attention_heads=cfg.reverse_qformer_heads,
                intermediate_size=cfg.reverse_qformer_intermediate_size, encoder_hidden_size=width,
                cross_attention_frequency=cfg.reverse_qformer_cross_attention_frequency))
            self.distill_image_proj = nn.Linear(width, gen_dim)

    def encode(self, causal: torch.Tensor) -> dict[str, torch.Tensor]:
        """Causal embeddings (B, Q, W) -> {quantized (straight-through), codes (B, Q), loss_vq}."""
        return self.quantize(self.encode_task_layer(causal))

    def codes_of(self, causal: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes_of(self.encode_task_layer(causal))

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x)
        return x

    def reconstruct(self, decoded: torch.Tensor) -> torch.Tensor:
        """decode_task_layer output (B, Q, W) -> the reconstructed causal embeddings (recon branch)."""
        return self._run(self.blocks, decoded + self.pos_embed)

    def generation_embeds(self, decoded: torch.Tensor) -> torch.Tensor:
        """decode_task_layer output (B, Q, W) -> the decoder's conditioning (B, N, D) (image branch + head)."""
        h = self._run(self.blocks_image, decoded + self.pos_embed_image)
        if self.cfg.head == "image_down":
            return self.distill_image_proj(self.image_down(h).flatten(1))[:, None]  # query-major flatten
        queries = self.reverse_tokens.expand(h.shape[0], -1, -1)
        out = self.reverse_qformer(query_embeds=queries, encoder_hidden_states=h).last_hidden_state
        return self.distill_image_proj(out)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids (B, Q) -> generation embeddings (B, N, D): what an LLM's image tokens decode through."""
        return self.generation_embeds(self.decode_task_layer(self.quantize.lookup(codes)))

    def forward(self, causal: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q = self.encode(causal)
        decoded = self.decode_task_layer(q["quantized"])
        recon = self.reconstruct(decoded)
        gen = self.generation_embeds(decoded)
        out = {"codes": q["codes"], "gen": gen, "loss_vq": q["loss_vq"],
               "loss_recon": (1 - F.cosine_similarity(recon.float(), causal.detach().float(), dim=-1)).mean()}
        if target is not None:
            out["loss_gen"] = F.mse_loss(gen.float(), target.detach().float())
        return out
