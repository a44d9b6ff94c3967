"""Autoregressive generation with the SEED-X MLLM: text, boxes and images (as ViT-space features).

Official inference (shared/reference/official-seedx.md "Inference"): once the model emits `<img>`, the
next 64 tokens are forced to `<img_00000>...<img_00063>` and then `</img>` (the official
`AutoImageTokenGenerationProcessor`); the last hidden states (after the final RMSNorm) at those 64
positions go through the output resampler, giving (64, vit_dim) features for a de-tokenizer. Outside an
image span those 64 tokens and `</img>` cannot be chosen (the official processor sets their logits to 0.0,
which only suppresses them while some other logit is positive; we mask them out, as intended).

Batched: prompts are left-padded (position ids count real tokens only), one KV-cached step per token
for every row; each row has its own forcing queue. Sampling draws from one CPU torch.Generator, so a
seed gives the same tokens on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from src.data.mllm_collate import MLLMCollator
from src.models.vocab import NUM_IMG_TOKENS_USED, image_token_ids

IMAGE_POLICIES = ("free", "first", "required")


@dataclass
class DecodingOptions:
    """`image`: `free` the model decides (chat); `first` the reply starts with `<img>` and stops after it
    (the pre-trained model's official `{caption}<img>` prompt); `required` the reply runs to its end (text,
    boxes, any number of images) and `<img>` is forced where it would end without an image (SEED-X-I t2i,
    edit, story, PPT). `box_first`: the reply starts with a forced `<box_start>` (the pre-trained model's
    official grounding prompt). `stop_texts`: the reply ends where its text starts one of these (the next
    turn of the chat template, e.g. `[INST]`: in training a reply that is not the conversation's last ends
    with the template, not with `</s>`); the stop text is not part of the reply."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    image: Literal["free", "first", "required"] = "free"
    box_first: bool = False
    stop_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image not in IMAGE_POLICIES:
            raise ValueError(f"generate.image must be one of {IMAGE_POLICIES}, got {self.image!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"generate.temperature must be > 0 and generate.top_p in (0, 1], got "
                             f"{self.temperature}, {self.top_p}")


@dataclass
class Generated:
    """One reply: its token ids (prompt excluded; forced ones included) and one (64, vit_dim) feature
    tensor per generated image, in order."""

    token_ids: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False


def next_tokens(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or temperature + nucleus (top-p) sampling on the CPU."""
    if not options.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= options.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class MLLMGenerator:
    """Plain modules in: the SEED-X MLLM (`src.models.mllm.SeedXMLLM`), its frozen ViT and tokenizer."""

    def __init__(self, mllm: nn.Module, vit: nn.Module, tokenizer, vit_chunk_size: int = 16) -> None:
        self.mllm, self.vit, self.tokenizer = mllm, vit, tokenizer
        self.ids = image_token_ids(tokenizer)  # looked up by name: any tokenizer that has the tokens
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)
        self.forced_image = [*self.ids.img[:NUM_IMG_TOKENS_USED], self.ids.img_end]
        self.vit_chunk_size = vit_chunk_size

    def _stopped_at(self, token_ids: list[int], start: int, stop_texts: tuple[str, ...]) -> int | None:
        """Where a stop text begins in the reply's free text since `start` (an index into `token_ids`). Checked
        after every token, so a stop text is found when its last token arrives: a few tokens back suffice."""
        for k in range(len(token_ids) - 1, max(start, len(token_ids) - 8) - 1, -1):
            text = self.tokenizer.decode(token_ids[k:], skip_special_tokens=False)
            if any(stop in text for stop in stop_texts):
                return k
        return None

    @property
    def device(self) -> torch.device:
        return self.mllm.llm.get_input_embeddings().weight.device

    @torch.no_grad()
    def encode_views(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
        if not pixels.shape[0]:
            return pixels.new_zeros(0, self.vit.cfg.n_queries, self.vit.cfg.output_dim, dtype=dtype)
        return torch.cat([self.vit(c.to(self.device, dtype)) for c in pixels.split(self.vit_chunk_size)])

    def _left_padded(self, samples: list[dict]) -> dict:
        """Samples of `SeedXSequenceBuilder.prompt` -> one left-padded batch (views in sample order)."""
        width = max(len(s["input_ids"]) for s in samples)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.cat([t.new_full((width - len(t),), value), t])

        batch = {
            "input_ids": torch.stack([pad(s["input_ids"], self.pad) for s in samples]),
            "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
            "ids_cmp_mask": torch.stack([pad(s["ids_cmp_mask"], False) for s in samples]),
            "vit_pixels": MLLMCollator._cat([s["vit_pixels"] for s in samples], torch.float32),
            "embeds_cmp_mask": torch.cat([s["embeds_cmp_mask"] for s in samples]),
            "patch_positions": torch.cat([s["patch_positions"] for s in samples]),
        }
        # A generated image earlier in the context is its own span: the query tokens' plain embeddings.
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, samples: list[dict], options: DecodingOptions, generator: torch.Generator | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Generated]:
        batch = self._left_padded(samples)
        n = len(samples)
        embeds, _ = self.mllm.embed(batch["input_ids"], batch["ids_cmp_mask"], self.encode_views(batch["vit_pixels"]),
                                    batch["embeds_cmp_mask"], batch["patch_positions"])
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits of the last position only, as transformers' generate asks for (the prompt's are never read);
        # hidden states only after a step that fed an image slot (recording them costs every layer a hook)
        out = self.mllm.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        results = [Generated() for _ in range(n)]
        start = [self.ids.box_start] if options.box_first else [self.ids.img_start] if options.image == "first" else []
        queues: list[list[int]] = [list(start) for _ in range(n)]
        outside_span = torch.tensor(self.forced_image, device=self.device)
        text_from = [0] * n  # where each reply's text since its last image starts (stop texts are searched there)
        slot_hidden: list[list[torch.Tensor]] = [[] for _ in range(n)]
        fed_slot = [False] * n  # did the row feed a forced image slot in the last step
        free = [0] * n  # tokens the row chose itself (forced ones do not count against max_new_tokens)
        slots = set(self.forced_image[:-1])
        while True:
            hidden = out.hidden_states[-1][:, -1] if any(fed_slot) else None
            for i in range(n):  # the output at a forced slot token is that slot's feature
                if fed_slot[i]:
                    slot_hidden[i].append(hidden[i])
                    if len(slot_hidden[i]) == NUM_IMG_TOKENS_USED:
                        h = torch.stack(slot_hidden[i]).unsqueeze(0)
                        results[i].images.append(self.mllm.output_resampler(h)[0])
                        slot_hidden[i] = []
            if all(r.finished for r in results):
                break
            logits = out.logits[:, -1].clone()
            logits[:, outside_span] = float("-inf")  # forced rows take their queue, not these logits
            sampled = next_tokens(logits, options, generator)
            tokens = []
            for i, r in enumerate(results):
                fed_slot[i] = False
                if r.finished:
                    tokens.append(self.pad)
                    continue
                forced = bool(queues[i])
                if forced:
                    tok = queues[i].pop(0)
                    fed_slot[i] = tok in slots
                else:
                    tok = int(sampled[i])
                    free[i] += 1
                    ends = tok == self.eos or free[i] >= options.max_new_tokens
                    if options.image == "required" and not r.images and ends:
                        tok = self.ids.img_start  # the reply must hold an image: open one instead of ending
                if tok == self.ids.img_start and not queues[i]:
                    queues[i] = list(self.forced_image)
                r.token_ids.append(tok)
                tokens.append(tok)
                if forced and tok == self.ids.img_end:
                    text_from[i] = len(r.token_ids)
                image_done = forced and tok == self.ids.img_end and options.image == "first"
                if not forced and options.stop_texts:
                    cut = self._stopped_at(r.token_ids, text_from[i], options.stop_texts)
                    if cut is not None:  # the model began the next turn: the reply ends before it
                        del r.token_ids[cut:]
                        if options.image == "required" and not r.images and not queues[i]:
                            tok = self.ids.img_start  # ... but it must hold an image: open one instead
                            r.token_ids.append(tok)
                            queues[i] = list(self.forced_image)
                        else:
                            tok = self.eos  # fed once so the row's cache stays aligned; not part of the reply
                            r.finished = True
                        tokens[-1] = tok
                if not queues[i] and (tok == self.eos or image_done or free[i] >= options.max_new_tokens):
                    r.finished = True
            if progress is not None:
                progress(1)
            ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.mllm.llm(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=out.past_key_values, use_cache=True, output_hidden_states=any(fed_slot))
        return results
