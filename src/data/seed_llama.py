"""SEED-LLaMA data: records whose images were tokenised offline into SEED codes -> discrete token sequences.

`python -m data_prep.tokenize_images` runs the SEED tokenizer over every image of a record source and writes
the records again with each image item carrying its codes (``{"image": ..., "codes": [32 ints]}``), in jsonl
shards; training reads those like any other record source (mixtures, streams, exact resume) and never
decodes an image.

Layout (the SEED-X builder's, `src/data/mllm_sequence.py`, with discrete images): ``<s>``, turns, ``</s>``;
an image is ``<img>`` + its 32 code tokens + ``</img>``, the same for inputs and generated images. Labels:
text follows the roles (all text of documents, assistant turns of chats); an image span is supervised
(``<img>``, codes and ``</img>`` all get CE) when its turn is and ``image_ce`` is on, so documents model text
and images left to right. Caption pairs are trained in both directions: ``t2i_ratio`` of them become
caption -> image (one document turn, everything supervised), the rest image -> caption.

Skip reasons added here: ``missing_codes`` (an image item without ``codes``), ``bad_codes`` (not exactly
``num_image_tokens`` integers in [0, 8192)), ``box_unsupported`` (SEED-LLaMA has no box tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import model_validator

from src.data.mllm import MLLMDataConfig, MLLMDataModule
from src.data.mllm_sequence import (
    CHAT_FORMATS,
    IGNORE_INDEX,
    ChatFormat,
    Draw,
    SeedXSequenceBuilder,
    _Segment,
    draw_unit,
)
from src.data.records import BadSample
from src.models.vocab import CODES_PER_IMAGE, NUM_IMAGE_CODES, add_seed_llama_tokens, seed_llama_token_ids
from src.utils.constraints import ConfigValueError, PositiveInt

__all__ = ["SEED_LLAMA_GEN_PROMPTS", "SEED_LLAMA_GEN_RESPONSES", "SeedLlamaDataModule", "SeedLlamaSequenceBuilder",
           "item_codes"]

# Official SEED-LLaMA SFT text-to-image prompts and their responses (MultiModalLLM/src/data/torchdata_sft.py
# `gen_prompt` / `gen_prompt_response`, parallel lists; prompts 14.. are questions and end with '?').
SEED_LLAMA_GEN_PROMPTS = (
    "Please show me a picture of", "Please design an image of", "Please produce a photo of",
    "Please generate an image of", "Please draw a painting of", "I'd like to see a drawing of",
    "I'd love to see an illustration of", "I'd like to view an image of", "I want to see a picture of",
    "I would like to see a photo of", "Show me a photo of", "Generate a picture of", "Show me a photograph of",
    "Generate an image of", "Can you make an image of", "Can you draw a painting of", "Can you produce a picture of",
    "Can you generate a photo of", "Can you depict a picture of", "Can you show me an illustration of",
)
SEED_LLAMA_GEN_RESPONSES = (
    "Here is a picture.", "I have designed an image.", "Here is a photo.", "I have generated an image.",
    "Here's a painting.", "Here's a drawing.", "Enjoy this illustration.", "Take a look at this image.",
    "Here is a picture.", "I have created a photo.", "Enjoy this photo.", "I have generated a picture.",
    "Here is a photograph.", "Here's an image.", "Certainly, here's an image.", "Absolutely, here is a painting.",
    "Sure, here is a picture.", "Of course, here is a photo.", "Certainly, please enjoy this picture.",
    "Sure, please enjoy this illustration.",
)


def item_codes(item: dict, n: int = CODES_PER_IMAGE) -> torch.Tensor:
    """An image item's stored codes as a LongTensor (n,); BadSample when absent or malformed."""
    codes = item.get("codes")
    if codes is None:
        raise BadSample("missing_codes", f"image {item.get('image')!r} has no 'codes' (tokenise the source with "
                                         f"python -m data_prep.tokenize_images)")
    if not (isinstance(codes, list) and len(codes) == n
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_IMAGE_CODES for c in codes)):
        raise BadSample("bad_codes", f"image {item.get('image')!r}: 'codes' must be {n} integers in "
                                     f"[0, {NUM_IMAGE_CODES}), got {str(codes)[:80]}")
    return torch.tensor(codes, dtype=torch.long)


class SeedLlamaSequenceBuilder(SeedXSequenceBuilder):
    def __init__(self, tokenizer, *args, image_ce: bool = True, **kwargs) -> None:
        self.image_ce = bool(image_ce)
        kwargs.setdefault("num_image_tokens", CODES_PER_IMAGE)
        if kwargs.get("features") is not None:
            raise ValueError("SEED-LLaMA reads image codes from its records; data.features_dir must be null")
        super().__init__(tokenizer, *args, **kwargs)

    def _init_tokens(self, tokenizer) -> None:
        self.tok = seed_llama_token_ids(tokenizer)  # raises if add_seed_llama_tokens was not called

    def _turns(self, record: dict, t2i: bool | None = None, draw: Draw = None) -> tuple[list[dict], ChatFormat]:
        turns, chat = super()._turns(record, t2i, draw)
        if turns is not record["turns"] and self.t2i_chat == CHAT_FORMATS["plain"]:
            # a flipped caption pair in pre-training: caption then image, one document turn
            text, image = turns[0]["content"][0], turns[1]["content"][0]
            return [{"role": None, "content": [text, image]}], self.chat
        return turns, chat

    def _official_wrappers(self, record: dict, turns: list[dict], draw: Draw) -> tuple[list[dict], dict[int, str]]:
        """SEED-LLaMA's text-to-image SFT form (official torchdata_sft.py `decode_question_answer_pair_for_llm`):
        `USER: {prompt k} {caption without its final '.'}{'?' for the "Can you" prompts, else '.'}\nASSISTANT:`
        then `{response k}<img>...</img></s>`, the response supervised with the image (unlike SEED-X's lead)."""
        if not (self.gen_prompts and self._is_generation_request(turns)):
            return turns, {}
        k = int(draw_unit(self.seed, "gen_prompt", record["id"], draw) * len(SEED_LLAMA_GEN_PROMPTS))
        caption = " ".join(it["text"].strip() for it in turns[0]["content"]).rstrip(".")
        punct = "?" if SEED_LLAMA_GEN_PROMPTS[k].startswith("Can you") else "."
        ask = {**turns[0], "content": [{"text": f"{SEED_LLAMA_GEN_PROMPTS[k]} {caption}{punct}"}]}
        answer = {**turns[1], "content": [{"text": SEED_LLAMA_GEN_RESPONSES[k]}, *turns[1]["content"]]}
        return [ask, answer], {}

    def _build(self, record: dict, t2i: bool | None = None, draw: Draw = None, prompt: bool = False) -> dict[str, Any]:
        if any("box" in item for turn in record["turns"] for item in turn["content"]):
            raise BadSample("box_unsupported", "SEED-LLaMA has no box tokens")
        return super()._build(record, t2i, draw, prompt)  # codes are read (and checked) where each image is laid out

    def _image_input(self, record: dict, item: dict, k: int, feats) -> tuple[tuple[int, int], int, torch.Tensor]:
        return (0, 0), 1, item_codes(item, self.num_image_tokens)  # no pixels: the codes are the image

    def _image_segment(self, img_size, item: dict, supervised: bool, codes: torch.Tensor) -> _Segment:
        ids = [self.tok.img_start, *self.tok.code_ids(codes).tolist(), self.tok.img_end]
        labels = list(ids) if (supervised and self.image_ce) else [IGNORE_INDEX] * len(ids)
        return _Segment(ids, labels, image=True, atomic=True)


class SeedLlamaDataConfig(MLLMDataConfig):
    """The `data` node of the SEED-LLaMA stages: the SEED-X one, with codes instead of pixels."""

    num_image_tokens: PositiveInt = CODES_PER_IMAGE
    image_ce: bool = True

    @model_validator(mode="after")
    def _codes_not_features(self):
        if self.features_dir:
            raise ConfigValueError("features_dir", "data.features_dir: SEED-LLaMA reads image codes from its "
                                                   "records; set it to null")
        return self


class SeedLlamaDataModule(MLLMDataModule):
    builder_class = SeedLlamaSequenceBuilder
    extend_tokenizer = staticmethod(add_seed_llama_tokens)
    config_model = SeedLlamaDataConfig

    def __init__(self, *args, image_ce: bool = True, **kwargs) -> None:
        kwargs.setdefault("num_image_tokens", CODES_PER_IMAGE)
        super().__init__(*args, **kwargs)
        self.builder_kwargs["image_ce"] = image_ce
