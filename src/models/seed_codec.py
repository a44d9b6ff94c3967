"""SEED tokenizer stage 2: causal embeddings -> discrete codes -> generation embeddings (plain torch).

    causal embeddings (B, 32, 768)  --encode_task_layer-->  (B, 32, 32)  --VQ 8192x32-->  codes (B, 32)
    codes --codebook--> (B, 32, 32) --decode_task_layer--> reconstructed causal embeddings (B, 32, 768)
    --reverse Q-Former (N learned queries cross-attending to them)--> gen_proj --> (B, N, D)

v2: N = 1, D = 1024, the CLIP-H image embedding the unCLIP SD 2.1 decoder takes; v1: N = 77, D = 768, the
SD text encoder's outputs. The reverse Q-Former is transformers' `Blip2QFormerModel` (its learned queries
attend to each other bidirectionally and cross-attend to the reconstructed embeddings in every layer).
Losses (stage): VQ (codebook + beta commitment), 1 - cosine(reconstruction, causal embedding), MSE of the
generation embeddings to the frozen target encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.models.vq import VectorQuantizer, VQConfig
from src.utils.constraints import PositiveInt

__all__ = ["SeedCodec", "SeedCodecConfig"]


@dataclass
class SeedCodecConfig:
    vq: dict[str, Any] = field(default_factory=dict)
    # the reverse Q-Former (BERT-base sized by default)
    decoder_layers: PositiveInt = 4
    decoder_heads: PositiveInt = 12
    decoder_intermediate_size: PositiveInt = 3072

    def __post_init__(self) -> None:
        self.vq_cfg = VQConfig(**self.vq)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


class SeedCodec(nn.Module):
    def __init__(self, cfg: SeedCodecConfig, width: int, gen_tokens: int, gen_dim: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if width % cfg.decoder_heads:
            raise ValueError(f"model.seed_codec.decoder_heads={cfg.decoder_heads} must divide the Q-Former width {width}")
        self.cfg = cfg
        self.encode_task_layer = _mlp(width, width, cfg.vq_cfg.dim)
        self.quantizer = VectorQuantizer(cfg.vq_cfg)
        self.decode_task_layer = _mlp(cfg.vq_cfg.dim, width, width)
        self.gen_queries = nn.Parameter(torch.randn(1, gen_tokens, width) * 0.02)
        self.reverse_qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=width, num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_heads,
            intermediate_size=cfg.decoder_intermediate_size, encoder_hidden_size=width, cross_attention_frequency=1))
        self.gen_proj = nn.Linear(width, gen_dim)

    def quantize(self, causal: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.quantizer(self.encode_task_layer(causal))

    def generation_embeds(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised vectors (B, Q, dim) -> (reconstructed causal embeddings, generation embeddings)."""
        recon = self.decode_task_layer(quantized)
        queries = self.gen_queries.expand(recon.shape[0], -1, -1)
        h = self.reverse_qformer(query_embeds=queries, encoder_hidden_states=recon).last_hidden_state
        return recon, self.gen_proj(h)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids (B, Q) -> generation embeddings (B, N, D): what an LLM's image tokens decode through."""
        return self.generation_embeds(self.quantizer.lookup(codes))[1]

    def forward(self, causal: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q = self.quantize(causal)
        recon, gen = self.generation_embeds(q["quantized"])
        out = {"codes": q["codes"], "gen": gen, "loss_vq": q["loss_vq"],
               "loss_recon": (1 - F.cosine_similarity(recon.float(), causal.detach().float(), dim=-1)).mean()}
        if target is not None:
            out["loss_gen"] = F.mse_loss(gen.float(), target.detach().float())
        return out
