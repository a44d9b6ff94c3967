"""SEED-LLaMA inference (captions of images, images from text) and SEED tokenizer reconstructions, over plain
modules.

* `caption`: the request's images are tokenised by the SEED tokenizer (EVA ViT -> causal Q-Former -> codes),
  laid out as in training (`<img>` + 32 code tokens + `</img>`), and the LLM continues in text (image tokens
  masked out) until `</s>` or `max_new_tokens`.
* `t2i`: the prompt is followed by `<img>`; exactly 32 tokens are drawn among the image codes only, then the
  codes go codebook -> decode task layer -> image branch + head -> generation embeddings -> the SEED decoder's
  diffusers pipeline (unCLIP SD 2.1 for v2, SD v1.4 for v1).

KV-cached decoding, one request at a time; greedy or temperature + top-p sampling from one CPU generator
(`next_tokens`, shared with SEED-X), so a seed gives the same result on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from src.data.images import vit_view
from src.data.records import load_image, record_images
from src.pipelines.mllm import DecodingOptions, next_tokens
from src.pipelines.seed_decode import decode_embeddings

SEED_LLAMA_MODES = ("caption", "t2i")


@dataclass
class SeedLlamaReply:
    text: str = ""
    codes: list[int] | None = None
    image: Image.Image | None = None


class SeedImages:
    """Images <-> SEED codes: a trained SEED tokenizer (`SeedTokenizerModule`: codes_of, codec, decoder_cfg) and
    its diffusers decoder pipeline (built on first use: captions need none)."""

    def __init__(self, image_tokenizer, decode_pipe: Callable[[], object]) -> None:
        self.tokenizer = image_tokenizer
        self.decode_pipe = decode_pipe

    @torch.no_grad()
    def attach_codes(self, record: dict) -> dict:
        """The record with `codes` on every image item (tokenised here unless it has them)."""
        size = self.tokenizer.vit_cfg.image_size
        for item in record_images(record):
            if "codes" not in item:
                view = vit_view(load_image(record, item), size)[None].to(self.tokenizer.device)
                item["codes"] = self.tokenizer.codes_of(view)[0].tolist()
        return record

    @torch.no_grad()
    def draw(self, codes: list[int], steps: int, guidance_scale: float | None, seed: int) -> Image.Image:
        """32 codes -> codebook -> decoder (task layer, image branch, head) -> generation embeddings -> the image."""
        embeds = self.tokenizer.codec.decode_codes(torch.tensor([codes], device=self.tokenizer.device))
        return decode_embeddings(self.decode_pipe(), self.tokenizer.decoder_cfg.kind, embeds, steps=steps,
                                 guidance_scale=guidance_scale, seed=seed)[0]


class SeedLlamaGenerator:
    def __init__(self, llm: nn.Module, tokenizer, builder, images: SeedImages) -> None:
        self.llm, self.tokenizer, self.builder, self.images = llm, tokenizer, builder, images
        self.ids = builder.tok
        vocab = llm.get_output_embeddings().weight.shape[0]
        self.code_mask = torch.zeros(vocab, dtype=torch.bool)
        self.code_mask[list(self.ids.codes)] = True

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # ---- decoding -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, ids: list[int], n: int, allowed: torch.Tensor, stop: int | None, options: DecodingOptions,
                generator: torch.Generator) -> list[int]:
        x = torch.tensor([ids], device=self.device)
        out = self.llm(input_ids=x, use_cache=True)
        new: list[int] = []
        for _ in range(n):
            logits = out.logits[:, -1].float().masked_fill(~allowed.to(self.device), float("-inf"))
            token = next_tokens(logits, options, generator)
            new.append(int(token))
            if (stop is not None and new[-1] == stop) or len(new) == n:
                break  # no forward pass for a token nothing follows
            out = self.llm(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
        return new

    def reply(self, record: dict, mode: str, options: DecodingOptions, generator: torch.Generator) -> SeedLlamaReply:
        if mode not in SEED_LLAMA_MODES:
            raise ValueError(f"mode={mode!r}: SEED-LLaMA answers {SEED_LLAMA_MODES}")
        prompt = self.builder.prompt(self.images.attach_codes(record))["input_ids"].tolist()
        if mode == "t2i":
            codes = self._decode(prompt + [self.ids.img_start], self.builder.num_image_tokens, self.code_mask, None,
                                 options, generator)
            return SeedLlamaReply(codes=self.ids.codes_of(torch.tensor(codes)).tolist())
        text_only = ~self.code_mask
        text_only[[self.ids.img_start, self.ids.img_end]] = False
        new = self._decode(prompt, options.max_new_tokens, text_only, self.tokenizer.eos_token_id, options, generator)
        return SeedLlamaReply(text=self.tokenizer.decode(new, skip_special_tokens=True).strip())
