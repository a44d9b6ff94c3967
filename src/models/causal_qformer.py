"""The SEED tokenizer's causal Q-Former: learned queries read a frozen ViT's features through BLIP-2's Q-Former
(transformers `Blip2QFormerModel`: BERT-style self-attention among the queries, cross-attention to the image
every `cross_attention_frequency` layers), with a causal mask among the queries so that query i sees queries
0..i only (SEED: "causal embeddings", a left-to-right sequence an LLM can model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CausalQFormer", "CausalQFormerConfig"]


@dataclass
class CausalQFormerConfig:
    num_queries: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408  # EVA-CLIP ViT-g/14 width
    cross_attention_frequency: int = 2
    causal: bool = True

    def hf_config(self):
        from transformers import Blip2QFormerConfig

        return Blip2QFormerConfig(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                                  num_attention_heads=self.num_attention_heads,
                                  intermediate_size=self.intermediate_size,
                                  encoder_hidden_size=self.encoder_hidden_size,
                                  cross_attention_frequency=self.cross_attention_frequency)


class CausalQFormer(nn.Module):
    def __init__(self, cfg: CausalQFormerConfig) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel

        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.qformer = Blip2QFormerModel(cfg.hf_config())

    def query_mask(self, batch: int, device) -> torch.Tensor | None:
        """(B, 1, Q, Q) boolean: query i may attend to query j iff j <= i (None: bidirectional)."""
        if not self.cfg.causal:
            return None
        q = self.cfg.num_queries
        return torch.tril(torch.ones(q, q, dtype=torch.bool, device=device))[None, None].expand(batch, 1, q, q)

    def forward(self, image_embeds: torch.Tensor, query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ViT features (B, N, encoder_hidden_size) -> causal query embeddings (B, Q, hidden_size)."""
        b = image_embeds.shape[0]
        queries = self.query_tokens.expand(b, -1, -1) if query_embeds is None else query_embeds
        out = self.qformer(query_embeds=queries, attention_mask=self.query_mask(b, image_embeds.device),
                           encoder_hidden_states=image_embeds)
        return out.last_hidden_state
