"""SEED-LLaMA inference (chats whose replies may hold images, captions, images from text) and SEED tokenizer
reconstructions, over plain modules.

* Input images are tokenised by the SEED tokenizer (EVA ViT -> causal Q-Former -> codes) and laid out as in
  training (`<img>` + 32 code tokens + `</img>`); an image the model drew earlier in a conversation stays its
  own codes in the context.
* `chat` (as released: free sampling, the 8B scripts' and the flask demo's): the model decides everything, so a
  reply may interleave text and images. A span `<img>` ... `</img>` becomes an image only with exactly 32
  image-code tokens inside (the released demo's check); any other span is dropped and counted
  (`rejected_images`). A reply ends at `</s>`, where its text starts the next user turn of the chat template
  (`USER:` / `[INST]`), or at `max_new_tokens`.
* `caption` (ours): text only, the image tokens masked out.
* `t2i`: `<img>` is forced first (the demo's `force_boi`); ours beyond it: the 32 tokens that follow are drawn
  among the image codes only and `</img>` closes the span, so every reply is a drawable image.

Codes go codebook -> decode task layer -> image branch + head -> the SEED decoder's diffusers pipeline (unCLIP
SD 2.1 for v2, SD v1.4 for v1) with the released decode settings by default (`SeedDecodeOptions`).

Batched, KV-cached, left-padded decoding; multi-turn requests (`src.pipelines.conversation.Conversation`) are
answered turn by turn, every reply going back into the context. Greedy or temperature + top-p sampling, each
request from its own CPU generator (`next_tokens`, shared with SEED-X), so a request's reply does not depend
on the batch it ran in, and a seed gives the same result on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from src.data.images import vit_view
from src.data.records import load_image, record_images
from src.pipelines.mllm import DecodingOptions, next_tokens
from src.pipelines.seed_decode import decode_embeddings

SEED_LLAMA_MODES = ("chat", "caption", "t2i")


@dataclass(frozen=True)
class SeedDecodeOptions:
    """How codes become pixels. Defaults as the released SEED-LLaMA decode (`seed_llama_tokenizer.py`): 20 steps,
    noise_level 0; guidance None = the decoder kind's released default (unCLIP 10, SD v1 7.5)."""

    steps: int = 20
    guidance_scale: float | None = None
    noise_level: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"seed_decode.steps must be >= 1, got {self.steps}")
        if self.guidance_scale is not None and float(self.guidance_scale) < 0:
            raise ValueError(f"seed_decode.guidance_scale must be >= 0 or null, got {self.guidance_scale}")
        if int(self.noise_level) < 0:
            raise ValueError(f"seed_decode.noise_level must be >= 0, got {self.noise_level}")

    @classmethod
    def of(cls, node) -> SeedDecodeOptions:
        """From a config node (`seed_decode` of the SEED experiments); None: the released defaults."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"steps", "guidance_scale", "noise_level"})
        if unknown:
            raise ValueError(f"seed_decode: unknown keys {unknown} (steps, guidance_scale, noise_level)")
        return cls(**node)


@dataclass
class SeedLlamaReply:
    """One reply: its pieces in order, ("text", str) | ("image", [32 codes]); `token_ids` as generated."""

    pieces: list[tuple[str, object]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    rejected_images: int = 0  # `<img>` spans without exactly 32 image codes (dropped, as released)

    @property
    def text(self) -> str:
        return " ".join(p for kind, p in self.pieces if kind == "text").strip()

    @property
    def images(self) -> list[list[int]]:
        return [p for kind, p in self.pieces if kind == "image"]

    @property
    def codes(self) -> list[int] | None:
        """The first image's codes (t2i), None without an image."""
        return self.images[0] if self.images else None


class SeedImages:
    """Images <-> SEED codes: a trained SEED tokenizer (`SeedTokenizerModule`: codes_of, codec, decoder_cfg) and
    its diffusers decoder pipeline (built on first use: captions need none)."""

    def __init__(self, image_tokenizer, decode_pipe: Callable[[], object],
                 decode: SeedDecodeOptions = SeedDecodeOptions()) -> None:
        self.tokenizer = image_tokenizer
        self.decode_pipe = decode_pipe
        self.decode = decode

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
    def draw(self, codes: list[int], seed: int) -> Image.Image:
        """32 codes -> codebook -> decoder (task layer, image branch, head) -> generation embeddings -> the image."""
        embeds = self.tokenizer.codec.decode_codes(torch.tensor([codes], device=self.tokenizer.device))
        d = self.decode
        return decode_embeddings(self.decode_pipe(), self.tokenizer.decoder_cfg.kind, embeds, steps=int(d.steps),
                                 guidance_scale=None if d.guidance_scale is None else float(d.guidance_scale),
                                 noise_level=int(d.noise_level), seed=seed)[0]


def reply_pieces(token_ids: list[int], ids, tokenizer) -> tuple[list[tuple[str, object]], int]:
    """Generated ids -> ([("text", str) | ("image", codes)], rejected spans). A span `<img>`...`</img>` (or
    `<img>` to the end) is an image only when it holds exactly 32 tokens, all image codes (the released check);
    text is decoded without special tokens."""
    code_of = {t: c for c, t in enumerate(ids.codes)}
    pieces: list[tuple[str, object]] = []
    text: list[int] = []
    rejected, i = 0, 0

    def flush() -> None:
        s = tokenizer.decode(text, skip_special_tokens=True).strip() if text else ""
        if s:
            pieces.append(("text", s))
        text.clear()

    while i < len(token_ids):
        tok = token_ids[i]
        if tok == ids.img_start:
            flush()
            end = token_ids.index(ids.img_end, i) if ids.img_end in token_ids[i:] else len(token_ids)
            inner = token_ids[i + 1:end]
            if len(inner) == 32 and all(t in code_of for t in inner):
                pieces.append(("image", [code_of[t] for t in inner]))
            else:
                rejected += 1
            i = end + 1
            continue
        if tok != ids.img_end and tok not in code_of:
            text.append(tok)
        i += 1
    flush()
    return pieces, rejected


class SeedLlamaGenerator:
    def __init__(self, llm: nn.Module, tokenizer, builder, images: SeedImages) -> None:
        self.llm, self.tokenizer, self.builder, self.images = llm, tokenizer, builder, images
        self.ids = builder.tok
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)
        vocab = llm.get_output_embeddings().weight.shape[0]
        self.code_mask = torch.zeros(vocab, dtype=torch.bool)
        self.code_mask[list(self.ids.codes)] = True
        self.text_mask = ~self.code_mask
        self.text_mask[[self.ids.img_start, self.ids.img_end]] = False
        # the next user turn of the chat template: a reply ends where its text starts one
        self.stop_text = builder.chat.user_prefix.strip()

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def _stopped_at(self, token_ids: list[int]) -> int | None:
        """Where the stop text begins in the reply's last few tokens (checked after every token)."""
        if not self.stop_text:
            return None
        for k in range(len(token_ids) - 1, max(0, len(token_ids) - 8) - 1, -1):
            if self.stop_text in self.tokenizer.decode(token_ids[k:], skip_special_tokens=False):
                return k
        return None

    # ---- decoding -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], mode: str, options: DecodingOptions,
                 generators: list[torch.Generator]) -> list[SeedLlamaReply]:
        """Replies to a batch of prompts (token ids), left-padded and decoded together with one KV cache."""
        if mode not in SEED_LLAMA_MODES:
            raise ValueError(f"mode={mode!r}: SEED-LLaMA answers {SEED_LLAMA_MODES}")
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        replies = [SeedLlamaReply() for _ in range(n)]
        done = [False] * n
        queue: list[list[int]] = [[self.ids.img_start] if mode == "t2i" else [] for _ in range(n)]
        codes_left = [0] * n  # t2i: image-code tokens still to draw in the open span
        free = [0] * n  # tokens the row chose (forced ones do not count against max_new_tokens)
        allowed_of = {"chat": None, "caption": self.text_mask.to(self.device), "t2i": None}
        codes_only = self.code_mask.to(self.device)
        while True:
            logits = out.logits[:, -1].float()
            tokens = []
            for i in range(n):
                if done[i]:
                    tokens.append(self.pad)
                    continue
                if queue[i]:
                    tok = queue[i].pop(0)
                else:
                    allowed = codes_only if codes_left[i] else allowed_of[mode]
                    row = logits[i:i + 1] if allowed is None else logits[i:i + 1].masked_fill(~allowed, float("-inf"))
                    tok = int(next_tokens(row, options, generators[i])[0])
                    if codes_left[i]:
                        codes_left[i] -= 1
                        if not codes_left[i]:
                            queue[i] = [self.ids.img_end]
                    else:
                        free[i] += 1
                reply = replies[i]
                reply.token_ids.append(tok)
                if mode == "t2i" and tok == self.ids.img_start:
                    codes_left[i] = self.builder.num_image_tokens
                cut = self._stopped_at(reply.token_ids) if mode != "t2i" and not codes_left[i] else None
                if cut is not None:  # the model began the next user turn: the reply ends before it
                    del reply.token_ids[cut:]
                    done[i] = True
                elif tok == self.eos or (mode == "t2i" and tok == self.ids.img_end) or (
                        free[i] >= options.max_new_tokens and not queue[i] and not codes_left[i]):
                    done[i] = True
                tokens.append(tok)
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.llm(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                           position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
        for r in replies:
            body = r.token_ids[:-1] if r.token_ids and r.token_ids[-1] == self.eos else r.token_ids
            r.pieces, r.rejected_images = reply_pieces(body, self.ids, self.tokenizer)
        return replies

    def prompt_ids(self, record: dict) -> list[int]:
        return self.builder.prompt(self.images.attach_codes(record))["input_ids"].tolist()

    def reply(self, record: dict, mode: str, options: DecodingOptions, generator: torch.Generator) -> SeedLlamaReply:
        """One reply to the record's turns (the model continues after the last one)."""
        return self.generate([self.prompt_ids(record)], mode, options, [generator])[0]
