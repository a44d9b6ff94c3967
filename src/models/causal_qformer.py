"""The SEED tokenizer's causal Q-Former: learned queries read a frozen ViT's features through BLIP-2's Q-Former
(transformers `Blip2QFormerModel`: BERT-style self-attention among the queries, cross-attention to the image
every `cross_attention_frequency` layers), with a causal mask among the queries so that query i sees queries
0..i only (SEED: "causal embeddings", a left-to-right sequence an LLM can model).

As in BLIP-2, the ViT features pass `ln_vision` (a LayerNorm over the ViT width) first, and the same Q-Former
also runs on text (its text feed-forward branch, `use_qformer_text_input`) for the stage-1 losses: text alone
(contrastive), queries + text (matching, captioning) with the masks of :func:`joint_mask`.

Masks are 4-D booleans (B, 1, L, L), True = may attend: transformers 5's Q-Former mishandles 3-D masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from src.utils.constraints import PositiveInt

__all__ = ["CausalQFormer", "CausalQFormerConfig", "joint_mask"]


@dataclass
class CausalQFormerConfig:
    num_queries: PositiveInt = 32
    hidden_size: PositiveInt = 768
    num_hidden_layers: PositiveInt = 12
    num_attention_heads: PositiveInt = 12
    intermediate_size: PositiveInt = 3072
    encoder_hidden_size: PositiveInt = 1408  # EVA-CLIP ViT-g/14 width
    cross_attention_frequency: PositiveInt = 2
    causal: bool = True
    # the text side (stage 1): BERT-base-uncased + BLIP-2's [DEC] token, 512 positions
    vocab_size: PositiveInt = 30523
    max_position_embeddings: PositiveInt = 512
    # the text feed-forward branch (stage 1's text passes); the stage-2 tokenizer drops it, as the released
    # one does (its Q-Former keeps only the query FFN)
    text_input: bool = True

    def hf_config(self):
        from transformers import Blip2QFormerConfig

        return Blip2QFormerConfig(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                                  num_attention_heads=self.num_attention_heads,
                                  intermediate_size=self.intermediate_size,
                                  encoder_hidden_size=self.encoder_hidden_size,
                                  cross_attention_frequency=self.cross_attention_frequency,
                                  vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                                  use_qformer_text_input=self.text_input)


def joint_mask(num_queries: int, text_mask: torch.Tensor, causal_queries: bool, text_causal: bool) -> torch.Tensor:
    """(B, 1, Q+T, Q+T) boolean mask of queries followed by text (`text_mask` (B, T), 1 = real token).

    Queries see queries (causally when `causal_queries`) and, for matching (`text_causal=False`), the text
    too; captioning (`text_causal=True`) keeps the queries blind to the text, as BLIP-2's multimodal causal
    mask. Text sees every query and the real text tokens before it (captioning) or all of them (matching).
    """
    b, t = text_mask.shape
    q, dev = num_queries, text_mask.device
    real = text_mask.bool()[:, None, :]  # (B, 1, T): columns that exist
    qq = torch.ones(q, q, dtype=torch.bool, device=dev)
    if causal_queries:
        qq = torch.tril(qq)
    top = torch.cat([qq.expand(b, q, q), real.expand(b, q, t) & (not text_causal)], dim=2)
    tt = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev)) if text_causal else torch.ones(
        t, t, dtype=torch.bool, device=dev)
    bottom = torch.cat([torch.ones(b, t, q, dtype=torch.bool, device=dev), tt[None] & real], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


class CausalQFormer(nn.Module):
    def __init__(self, cfg: CausalQFormerConfig) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel

        self.cfg = cfg
        self.ln_vision = nn.LayerNorm(cfg.encoder_hidden_size)
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
                           encoder_hidden_states=self.ln_vision(image_embeds))
        return out.last_hidden_state

    def encode_text(self, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text alone (no queries, no image): (B, T, hidden), bidirectional over the real tokens."""
        mask = text_mask.bool()[:, None, None, :].expand(-1, 1, text_mask.shape[1], -1)
        return self.qformer(query_embeds=text_embeds, query_length=0, attention_mask=mask).last_hidden_state

    def joint(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
              text_causal: bool) -> torch.Tensor:
        """Queries + text over the image: (B, Q + T, hidden) (matching: bidirectional text; captioning: causal)."""
        b = image_embeds.shape[0]
        x = torch.cat([self.query_tokens.expand(b, -1, -1), text_embeds.to(self.query_tokens.dtype)], dim=1)
        mask = joint_mask(self.cfg.num_queries, text_mask, self.cfg.causal, text_causal)
        return self.qformer(query_embeds=x, query_length=self.cfg.num_queries, attention_mask=mask,
                            encoder_hidden_states=self.ln_vision(image_embeds)).last_hidden_state
