"""SEED tokenizer stage 1: the causal Q-Former trained on image-caption pairs.

Default, as released (SEED_Tokenizer `Blip2QformerCasual`: `contrastive=True`, `matching=False`,
`caption=False`): ITC alone, on the **last** causal query (`itc_query: last`; the causal mask makes it the
one that has read every other query), against the text's [CLS], over a learned temperature that is never
clamped, label smoothing 0.1 both ways, halved. Option (ours, the BLIP-2 recipe: `itc_query: max`,
`clamp_temp: true`, `itm_weight` / `itg_weight` > 0): the three BLIP-2 losses through the one Q-Former
(`CausalQFormer`):

* ITC, image-text contrastive: each query's output projected to `embed_dim` and normalised, the text's first
  token ([CLS]) likewise; the image-text similarity is the max over queries (`itc_query: max`), / a learned
  temperature (clamped to [0.001, 0.5] with `clamp_temp`); symmetric cross-entropy over the batch, all
  ranks' texts and images as negatives.
* ITM, image-text matching: for every image a hard negative text and for every text a hard negative image
  are drawn from the ITC similarities (softmax, the positive excluded); queries + text run jointly and the
  query outputs' `itm_head` logits are averaged; 2-way cross-entropy over B positives and 2B negatives.
  Needs >= 2 samples on the rank (else the pass runs at zero weight).
* ITG, image-grounded captioning: the text's first token replaced by [DEC], queries + text with the
  multimodal causal mask (`joint_mask`), a BERT LM head (tied to the word embeddings) predicts the next
  token, cross-entropy with label smoothing 0.1 over real tokens.
A loss at weight 0 is not computed, and its head (ITM's classifier, ITG's LM head) not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.models.causal_qformer import CausalQFormer, CausalQFormerConfig
from src.utils.constraints import PositiveInt

__all__ = ["QFormerPretrainConfig", "QFormerPretrainer", "gather_batch"]

IGNORE_INDEX = -100


@dataclass
class QFormerPretrainConfig:
    qformer: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # a local text tokenizer folder (bert-base-uncased at full size)
    # stage 1's start: LAVIS blip2_pretrained.pth (as released) or a bert-base-uncased state dict; null: random
    weights: str | None = None
    # stage 2 without a stage-1 checkpoint (tiny twins): a seeded random Q-Former
    allow_random_init: bool = False
    embed_dim: PositiveInt = 256  # ITC projection
    max_text_len: PositiveInt = 32
    label_smoothing: float = 0.1
    itc_query: str = "last"  # released: the last causal query; "max": BLIP-2's max over queries
    clamp_temp: bool = False  # released: never clamped; BLIP-2 clamps to [0.001, 0.5]
    itc_weight: float = 1.0
    itm_weight: float = 0.0  # released: ITC only
    itg_weight: float = 0.0

    def __post_init__(self) -> None:
        self.qformer_cfg = CausalQFormerConfig(**self.qformer)
        if self.max_text_len > self.qformer_cfg.max_position_embeddings:
            raise ValueError(f"model.qformer.max_text_len={self.max_text_len} exceeds "
                             f"model.qformer.qformer.max_position_embeddings={self.qformer_cfg.max_position_embeddings}")
        if self.itc_query not in ("last", "max"):
            raise ValueError(f"model.qformer.itc_query={self.itc_query!r} must be 'last' (released) or 'max' (BLIP-2)")
        for key in ("itc_weight", "itm_weight", "itg_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.qformer.{key} must be >= 0, got {getattr(self, key)}")


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of x (gradients flow back to this rank's rows) and this rank's row offset. Ranks may hold
    different numbers of rows (skipped samples): each pads to the largest, and the padding is cut out again."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])])
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def _bert_init(module: nn.Module) -> None:
    # BERT's init (std 0.02): torch's defaults (N(0, 1) embeddings) would start the tied LM head far off.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class QFormerPretrainer(nn.Module):
    """The Q-Former and BLIP-2's stage-1 heads (names as LAVIS: vision_proj, text_proj, itm_head, temp)."""

    def __init__(self, cfg: QFormerPretrainConfig, dec_token_id: int) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        self.cfg = cfg
        qc = cfg.qformer_cfg
        self.dec_token_id = int(dec_token_id)
        self.qformer = CausalQFormer(qc)
        self.text_embeddings = Blip2TextEmbeddings(qc.hf_config())
        self.vision_proj = nn.Linear(qc.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(qc.hidden_size, cfg.embed_dim)
        heads = [self.text_embeddings, self.vision_proj, self.text_proj]
        # unused heads are not built: DDP would fail on parameters that never get a gradient
        if cfg.itm_weight > 0:
            self.itm_head = nn.Linear(qc.hidden_size, 2)
            heads.append(self.itm_head)
        if cfg.itg_weight > 0:
            self.lm_head = BertOnlyMLMHead(BertConfig(hidden_size=qc.hidden_size, vocab_size=qc.vocab_size))
            self.lm_head.predictions.decoder.weight = self.text_embeddings.word_embeddings.weight  # tied, as BERT
            heads.append(self.lm_head)
        self.temp = nn.Parameter(torch.full((1,), 0.07))  # 1-D: FSDP2 shards no scalars
        for module in heads:
            module.apply(_bert_init)

    # ---- the three losses ---------------------------------------------------------------------------
    def itc(self, query_out: torch.Tensor, text_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, this rank's image->text and text->image similarities (B, B) for negative mining)."""
        if self.cfg.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        if self.cfg.itc_query == "last":
            query_out = query_out[:, -1:]  # the last causal query alone: Q = 1 below
        img = F.normalize(self.vision_proj(query_out), dim=-1)  # (B, Q, E)
        txt = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # (B, E)
        img_all, offset = gather_batch(img)
        txt_all, _ = gather_batch(txt)
        sim_i2t = torch.einsum("bqe,ne->bnq", img, txt_all).amax(-1) / self.temp  # (B, B_all)
        sim_t2i = torch.einsum("be,nqe->bnq", txt, img_all).amax(-1) / self.temp  # (B, B_all)
        targets = torch.arange(img.shape[0], device=img.device) + offset
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=self.cfg.label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=self.cfg.label_smoothing)) / 2
        return loss, sim_i2t.detach()[:, offset:offset + img.shape[0]], sim_t2i.detach()[:, offset:offset + img.shape[0]]

    def itm(self, image_embeds, ids, mask, sim_i2t, sim_t2i, generator: torch.Generator | None) -> torch.Tensor:
        b = ids.shape[0]
        if b < 2:
            # No negative on this rank: the same joint pass at zero weight, so every rank runs the same
            # (sharded) layers the same number of times.
            neg_img = neg_txt = torch.arange(b, device=ids.device)
        else:
            eye = torch.eye(b, dtype=torch.bool)
            w_t2i = sim_t2i.float().cpu().softmax(1).masked_fill(eye, 0.0) + 1e-6 * ~eye
            w_i2t = sim_i2t.float().cpu().softmax(1).masked_fill(eye, 0.0) + 1e-6 * ~eye
            neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1).to(ids.device)  # per text
            neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1).to(ids.device)  # per image
        images = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])
        texts = torch.cat([ids, ids, ids[neg_txt]])
        masks = torch.cat([mask, mask, mask[neg_txt]])
        out = self.qformer.joint(images, self.text_embeddings(input_ids=texts), masks, text_causal=False)
        logits = self.itm_head(out[:, : self.cfg.qformer_cfg.num_queries]).mean(1)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(ids.device)
        return F.cross_entropy(logits.float(), labels) * (1.0 if b >= 2 else 0.0)

    def itg(self, image_embeds, ids, mask) -> torch.Tensor:
        dec = ids.clone()
        dec[:, 0] = self.dec_token_id
        labels = dec.masked_fill(mask == 0, IGNORE_INDEX)
        out = self.qformer.joint(image_embeds, self.text_embeddings(input_ids=dec), mask, text_causal=True)
        logits = self.lm_head(out[:, self.cfg.qformer_cfg.num_queries:])
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing)

    def forward(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """ViT features (B, N, D) and tokenised captions (B, T) -> the weighted loss and its parts."""
        query_out = self.qformer(image_embeds)
        text_out = self.qformer.encode_text(self.text_embeddings(input_ids=ids), mask)
        c = self.cfg
        itc, sim_i2t, sim_t2i = self.itc(query_out, text_out)
        loss, out = c.itc_weight * itc, {"loss_itc": itc.detach()}
        if c.itm_weight > 0:
            itm = self.itm(image_embeds, ids, mask, sim_i2t, sim_t2i, generator)
            loss, out["loss_itm"] = loss + c.itm_weight * itm, itm.detach()
        if c.itg_weight > 0:
            itg = self.itg(image_embeds, ids, mask)
            loss, out["loss_itg"] = loss + c.itg_weight * itg, itg.detach()
        return {"loss": loss, **out}
