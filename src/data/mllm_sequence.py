"""Record -> one SEED-X MLLM training sample (token ids, labels, image-position masks, ViT views).

Layout (official SEED-X, see shared/reference/official-seedx.md "MLLM wrapper"):

* ``<s>`` first (label -100); ``</s>`` last, with CE when the sample has any supervised position.
* Role ``null`` (documents): every text item is supervised. ``system``: its text then ``"\\n"``, no CE.
  ``user``: wrapped by ``chat_format`` (``llama2``: ``[INST] {content} [/INST]\\n``) with no CE (a ``"\\n"``
  turn separator before every user turn that follows another turn, as official ``sft_clm.py``);
  ``assistant``: its text is supervised.
* A comprehension image (not ``generate``) is tiled at dynamic resolution (``select_grid`` over ``grids``
  with tile = ``vit_image_size``, or the item's own ``"grid": "AxB"``): one ``<patch>`` + 64 image tokens
  + ``</patch>`` span per tile (row-major), then ``<img>`` + 64 + ``</img>`` for the global view -- also
  for a 1x1 grid, as officially. All these positions are -100; the 64 inner positions of every span are
  ``ids_cmp_mask`` and every view is ``embeds_cmp_mask``.
* A generated image (``"generate": true``) is one ``<img>`` + 64 + ``</img>`` span of the global view
  only: ``<img>`` gets CE when its turn is supervised (null / assistant), the 64 inner positions are
  ``ids_gen_mask`` (label -100), ``</img>`` is -100; its view is ``embeds_gen_mask``.
* Caption -> image (a caption pair drawn by ``t2i_ratio``, or ``t2i=True``): a user turn holding the
  caption, wrapped by ``t2i_chat_format`` (default ``plain``: no wrapping, official pre-training has no
  instruction prompt), then an assistant turn holding the generated image. So the caption is -100, as
  officially, and only ``<img>`` and ``</s>`` carry CE.
* A box item becomes ``<box_start><loc-xc><loc-yc><loc-w><loc-h><box_end>``, quantised against the most
  recent image before it (after turning it, like the image, by the image's EXIF orientation: record
  boxes are in the stored pixel frame), or against its own ``canvas`` (slide layouts), and is supervised
  like the text around it. A box ``label`` is metadata only.

Text is tokenised with ``add_special_tokens=False``; adjacent text pieces that share a label are joined
into one string first (so ``[INST] `` + question + `` [/INST]\\n`` is one piece), and image / box spans
are built from token ids, so nothing merges across a span boundary.

* Official SFT wrappers (off in pre-training): ``gen_prompts`` asks a caption -> image exchange with one of
  the 28 official generation prompts and leads the answer with the matching response, unsupervised
  (``[INST] {prompt} {caption} [/INST]\\n {response}``, then ``<img>``); ``edit_responses`` puts one of the
  official short replies, supervised, before an edit answer that is the image alone. Picks, like the
  direction of a caption pair, are drawn per use of a record from (seed, record id, ``draw``).
* Every sample lists its image views in order (``views``: ``kind`` tile|global, ``role`` input|generate,
  ``grid``), what ``python -m src.inspect_data`` and ``src.generate save_prompts=true`` print.

Bad input never raises: the builder returns ``{"skipped": SkippedSample}`` (reasons of ``load_image`` and
``validate_record``, plus ``special_token_in_text``, ``box_without_image``, ``too_long``,
``no_supervised_token``: a cut to ``max_length`` left no position with a loss).

Precomputed features (``features=FeatureStore``, see ``src/data/features.py``): no image is decoded; the
grid comes from the stored image size and the sample carries ``vit_features`` (n, T, D), the frozen ViT's
output for the same views in the same order, instead of ``vit_pixels``. Missing or broken entries are
skipped (``missing_features``, ``bad_features``) like bad images. The views themselves are made by
:meth:`SeedXSequenceBuilder.image_views`, which ``data_prep/precompute_features.py`` calls too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from src.data.any_res import DEFAULT_GRIDS, grid_refusal, parse_grid, select_grid, tile_image, tile_positions
from src.data.bbox import orient_box, oriented_size, quantize_box
from src.data.images import vit_view
from src.data.records import (
    ORIENTATION_KEY,
    BadSample,
    SkippedSample,
    check_image_size,
    load_image,
    record_images,
    validate_record,
)
from src.models.vocab import NUM_IMG_TOKENS, SEEDX_TOKENS, image_token_ids

IGNORE_INDEX = -100
TRUNCATION_MODES = ("cut", "skip")


@dataclass(frozen=True)
class ChatFormat:
    """How user / system turns are wrapped (all of it unsupervised)."""

    user_prefix: str
    user_suffix: str
    turn_sep: str
    system_suffix: str


CHAT_FORMATS: dict[str, ChatFormat] = {
    # SEED-X-I (official sft_clm.py: instruction_prompt='[INST] {instruction} [/INST]\n', turn_sep='\n')
    "llama2": ChatFormat(user_prefix="[INST] ", user_suffix=" [/INST]\n", turn_sep="\n", system_suffix="\n"),
    # No wrapping: the pretrained model's text-to-image prompt is `{caption}<img>` (official inference)
    "plain": ChatFormat(user_prefix="", user_suffix="", turn_sep="", system_suffix=""),
    # The pretrained model's comprehension prompt (official inference): `Question: {q}\nAnswer:`
    "qa": ChatFormat(user_prefix="Question: ", user_suffix="\nAnswer:", turn_sep="\n", system_suffix="\n"),
    # The pretrained model's grounding prompt (official bbox_prompt `{image}{caption} [[ <box_start>`; the
    # generator forces `<box_start>`): GRIT-style text, `phrase [[ <box_start>...<box_end> ]]`
    "ground": ChatFormat(user_prefix="", user_suffix=" [[ ", turn_sep="\n", system_suffix="\n"),
    # SEED-LLaMA-8B (Vicuna-7B; official MultiModalLLM torchdata_sft.py: `USER: {content}\nASSISTANT:{answer}`,
    # a later turn opens with `\nUSER: `, system message + "\n")
    "vicuna": ChatFormat(user_prefix="USER: ", user_suffix="\nASSISTANT:", turn_sep="\n", system_suffix="\n"),
}

# Official SFT text-to-image wrapper (image_text_pairs_clm.py `gen_prompt_all` / `gen_prompt_response_all`,
# parallel lists: prompt k goes with response k). The caption becomes `{prompt} {caption}` and the response
# follows `[/INST]\n` unsupervised, before the image.
GEN_PROMPTS = (
    "Please show me a picture of", "Please design an image of", "Please produce a photo of",
    "Please generate an image of", "Please draw a painting of", "I'd like to see a drawing of",
    "I'd love to see an illustration of", "I'd like to view an image of", "I want to see a picture of",
    "I would like to see a photo of", "Show me a photo of", "Generate a picture of", "Show me a photograph of",
    "Generate an image of", "Generate an image:", "Generate a picture:", "Generate a painting:",
    "Generate a photograph:", "Show me a photograph:", "Draw a picture:", "Draw a painting:", "Draw an image:",
    "Can you make an image of", "Can you draw a painting of", "Can you produce a picture of",
    "Can you generate a photo of", "Can you depict a picture of", "Can you show me an illustration of",
)
GEN_PROMPT_RESPONSES = (
    "Here is a picture.", "I have designed an image.", "Here is a photo.", "I have generated an image.",
    "Here's a painting.", "Here's a drawing.", "Enjoy this illustration.", "Take a look at this image.",
    "Here is a picture.", "I have created a photo.", "Enjoy this photo.", "I have generated a picture.",
    "Here is a photograph.", "Here's an image.", "Here's an image.", "Here's a picture.", "Here's a painting.",
    "Here's a photograph.", "Here's a photograph.", "Enjoy this picture.", "Enjoy this painting.",
    "Enjoy this image.", "Absolutely, here is an image.", "Absolutely, here is a painting.",
    "Sure, here is a picture.", "Of course, here is a photo.", "Certainly, please enjoy this picture.",
    "Sure, please enjoy this illustration.",
)
# Official SFT edit answers (sft_clm.py `gen_prompt_response`): one of these, supervised, before the image
# ("" = the image alone).
EDIT_RESPONSES = (
    "Here is a picture.", "I have designed an image.", "Here is a photo.", "I have generated an image.",
    "Here's a painting.", "Here's a drawing.", "Enjoy this illustration.", "Take a look at this image.",
    "Here is a picture.", "I have created a photo.", "Enjoy this photo.", "I have generated a picture.",
    "Here is a photograph.", "Here's an image.", "Certainly, here's an image.", "Absolutely, here is a painting.",
    "Sure, here is a picture.", "Of course, here is a photo.", "Certainly, please enjoy this picture.",
    "Sure, please enjoy this illustration.", "",
)

__all__ = ["CHAT_FORMATS", "EDIT_RESPONSES", "GEN_PROMPTS", "GEN_PROMPT_RESPONSES", "IGNORE_INDEX",
           "SeedXSequenceBuilder", "draw_unit", "t2i_flip"]

Draw = tuple[int, int] | None  # (epoch, global position in the epoch's order) of one use of a record


def draw_unit(seed: int, tag: str, record_id: str, draw: Draw = None, *salt: object) -> float:
    """A number in [0, 1) from (seed, tag, record id, draw, salt): the same on every worker, rank and resume,
    and fresh for every use of a record (``draw``: its epoch and position in the epoch's global order, given
    by the training sampler; None = one fixed value per record, e.g. validation and probes)."""
    key = "\x00".join(str(v) for v in (seed, tag, record_id, draw, *salt))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def t2i_flip(seed: int, record_id: str, ratio: float, draw: Draw = None) -> bool:
    """Deterministic coin with P(True) = ``ratio`` for one use of a caption pair (official SEED-X draws the
    direction afresh each time a pair is used)."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    return draw_unit(seed, "t2i", record_id, draw) < ratio


@dataclass
class _Segment:
    """A run of tokens. ``atomic`` segments (all spans of one image; a box) are never cut."""

    ids: list[int]
    labels: list[int]
    cmp: list[bool] = field(default_factory=list)
    gen: list[bool] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)
    view_is_gen: list[bool] = field(default_factory=list)
    positions: list[tuple[float, float]] = field(default_factory=list)
    view_info: list[dict] = field(default_factory=list)  # per view: kind tile|global, role input|generate, grid
    image: bool = False
    atomic: bool = False

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.cmp = self.cmp or [False] * n
        self.gen = self.gen or [False] * n


class SeedXSequenceBuilder:
    """Turns a record (or a read-time :class:`SkippedSample`) into a sample dict; see the module docstring.

    Sample keys: ``input_ids``, ``labels`` (LongTensor (L,), labels not shifted), ``ids_cmp_mask``,
    ``ids_gen_mask`` (BoolTensor (L,)), ``vit_pixels`` (n, 3, S, S) -- or ``vit_features`` (n, T, D) with a
    feature store --, ``embeds_cmp_mask``, ``embeds_gen_mask`` (BoolTensor (n,)), ``patch_positions`` (n, 2),
    ``id``, ``source``, ``truncated``.
    """

    def __init__(
        self,
        tokenizer,
        vit_image_size: int = 448,
        grids: Sequence[str] = DEFAULT_GRIDS,
        num_image_tokens: int = 64,
        max_length: int = 2048,
        truncation: str = "cut",
        t2i_ratio: float = 0.0,
        seed: int = 0,
        min_image_size: int = 8,
        max_aspect_ratio: float = 8.0,
        chat_format: str = "llama2",
        features=None,
        t2i_chat_format: str = "plain",
        gen_prompts: bool = False,
        edit_responses: bool = False,
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation: expected one of {TRUNCATION_MODES}, got {truncation!r}")
        for key, value in (("chat_format", chat_format), ("t2i_chat_format", t2i_chat_format)):
            if value not in CHAT_FORMATS:
                raise ValueError(f"{key}: expected one of {sorted(CHAT_FORMATS)}, got {value!r}")
        if not 1 <= num_image_tokens <= NUM_IMG_TOKENS:
            raise ValueError(f"num_image_tokens: must be in [1, {NUM_IMG_TOKENS}], got {num_image_tokens}")
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2 (BOS + one token), got {max_length}")
        if not 0.0 <= t2i_ratio <= 1.0:
            raise ValueError(f"t2i_ratio: must be in [0, 1], got {t2i_ratio}")
        if vit_image_size < 1:
            raise ValueError(f"vit_image_size: must be positive, got {vit_image_size}")
        for g in grids:
            parse_grid(g)  # raises naming the bad grid
        self.tokenizer = tokenizer
        self.vit_image_size = int(vit_image_size)
        self.grids = tuple(grids)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self.truncation = truncation
        self.t2i_ratio = float(t2i_ratio)
        self.seed = int(seed)
        self.min_image_size = int(min_image_size)
        self.max_aspect_ratio = max_aspect_ratio
        self.chat = CHAT_FORMATS[chat_format]
        self.t2i_chat = CHAT_FORMATS[t2i_chat_format]  # wraps the caption turn of a caption -> image sample
        self.features = features  # a src.data.features.FeatureStore, or None: pixels
        self.gen_prompts = bool(gen_prompts)  # official SFT wrapper of caption -> image samples
        self.edit_responses = bool(edit_responses)  # official SEED-X-Edit short reply before the image

        self._init_tokens(tokenizer)
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: needs bos_token_id and eos_token_id")
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        reserved = set(SEEDX_TOKENS) | {"<s>", "</s>"} | set(tokenizer.all_special_tokens)
        reserved |= set(tokenizer.get_added_vocab())
        self._reserved = re.compile("|".join(re.escape(t) for t in sorted(reserved, key=len, reverse=True)))

    def _init_tokens(self, tokenizer) -> None:
        """The special-token ids the layout uses (SEED-LLaMA's builder has its own)."""
        self.tok = image_token_ids(tokenizer)  # raises if add_seedx_tokens was not called
        self.slot_ids = list(self.tok.img[: self.num_image_tokens])

    # ------------------------------------------------------------------------------------------ public
    def __call__(self, record: dict | SkippedSample, t2i: bool | None = None, draw: Draw = None) -> dict[str, Any]:
        """``t2i``: None draws the direction of a caption pair by ``t2i_ratio``; True / False force it (probes;
        True on a record that is not a caption pair raises ValueError). ``draw``: which use of the record this
        is (the training sampler's (epoch, position)); the caption-pair direction and the official prompt /
        response picks are drawn from it, so repeats and epochs vary and a resume draws the same again."""
        if isinstance(record, SkippedSample):
            return {"skipped": record}
        source = record.get("source") if isinstance(record, dict) else None
        rid = record.get("id") if isinstance(record, dict) else None
        where = record.get("_where") if isinstance(record, dict) else None
        try:
            validate_record(record)
            return self._build(record, t2i, draw)
        except BadSample as e:
            return {"skipped": e.to_skipped(source if isinstance(source, str) else None,
                                            rid if isinstance(rid, str) else None,
                                            where if isinstance(where, str) else None)}

    def prompt(self, record: dict, t2i: bool | None = False) -> dict[str, Any]:
        """The sample of ``record`` as a generation prompt: the same layout without the closing ``</s>``
        (the model continues after the last turn). An image the model generated earlier (``generate``) stays
        its own span, ``<img>`` + the query tokens + ``</img>``, as in training: no ViT view of it is encoded
        (its view stays listed in ``views`` with role ``generate``, but not in ``vit_pixels``).

        A prompt longer than ``max_length`` loses its oldest whole turns (never BOS or the latest request);
        ``dropped_turns`` says how many. When even the latest request alone does not fit, or the record is bad
        input, ValueError names the request and the reason."""
        try:
            validate_record(record)
        except BadSample as e:
            raise ValueError(f"request {record.get('id')!r}: {e.reason}: {e.detail}") from None
        turns = record["turns"]
        head = turns[:1] if turns[0].get("role") == "system" else []  # a system turn is kept
        last_user = max((i for i, t in enumerate(turns) if t.get("role") == "user"), default=0)
        # the oldest whole turns go first; a kept context starts at a user turn
        starts = [len(head)] + [i for i in range(len(head) + 1, last_user + 1) if turns[i].get("role") == "user"]
        for start in starts:
            candidate = {**record, "turns": head + turns[start:]}
            try:
                sample = self._build(candidate, t2i, None, prompt=True)
            except BadSample as e:
                if e.reason == "too_long":
                    continue
                raise ValueError(f"request {record.get('id')!r}: {e.reason}: {e.detail}") from None
            if int(sample["input_ids"][-1]) == self.eos_id:  # the model continues after the last turn
                for k in ("input_ids", "labels", "ids_cmp_mask", "ids_gen_mask"):
                    sample[k] = sample[k][:-1]
            sample["dropped_turns"] = start - len(head)
            return self._without_generated_views(sample)
        raise ValueError(f"request {record.get('id')!r}: too_long: even the latest request alone is longer than "
                         f"data.max_length={self.max_length} tokens (shorten it, or raise data.max_length)")

    @staticmethod
    def _without_generated_views(sample: dict[str, Any]) -> dict[str, Any]:
        """A prompt encodes no view of an image the model generated: its span is the query tokens."""
        keep = ~sample["embeds_gen_mask"]
        view_key = "vit_features" if "vit_features" in sample else "vit_pixels"
        sample[view_key] = sample[view_key][keep]
        sample["patch_positions"] = sample["patch_positions"][keep]
        sample["embeds_cmp_mask"] = sample["embeds_cmp_mask"][keep]
        sample["embeds_gen_mask"] = sample["embeds_gen_mask"][keep]
        return sample

    def is_t2i_candidate(self, record: dict) -> bool:
        """Exactly one role-null turn holding [comprehension image, text] (an image-caption pair)."""
        turns = record["turns"]
        if len(turns) != 1 or turns[0].get("role") is not None:
            return False
        content = turns[0]["content"]
        return (len(content) == 2 and "image" in content[0] and not content[0].get("generate", False)
                and "text" in content[1])

    # ------------------------------------------------------------------------------------------ build
    def _check_text(self, text: str, at: str) -> None:
        m = self._reserved.search(text)
        if m:
            raise BadSample("special_token_in_text", f"{at} contains the special token {m.group(0)!r}")

    def _turns(self, record: dict, t2i: bool | None = None, draw: Draw = None) -> tuple[list[dict], ChatFormat]:
        """The turns to lay out and the format wrapping their user turns."""
        turns = record["turns"]
        if t2i and not self.is_t2i_candidate(record):
            raise ValueError(f"t2i=True: record {record['id']!r} is not an image-caption pair")
        if t2i is None:
            t2i = (self.t2i_ratio > 0 and self.is_t2i_candidate(record)
                   and t2i_flip(self.seed, record["id"], self.t2i_ratio, draw))
        if t2i:
            image, text = turns[0]["content"]
            gen_image = {k: v for k, v in image.items() if k != "grid"}
            gen_image["generate"] = True
            # The caption is the condition, not a target: a user turn, so it gets no CE (official SEED-X).
            flipped = [{"role": "user", "content": [text]}, {"role": "assistant", "content": [gen_image]}]
            return flipped, self.t2i_chat
        return turns, self.chat

    @staticmethod
    def _is_generation_request(turns: list[dict]) -> bool:
        """A caption -> image exchange: one user turn of text only, answered by one generated image."""
        return (len(turns) == 2 and turns[0].get("role") == "user" and turns[1].get("role") == "assistant"
                and all("text" in it for it in turns[0]["content"])
                and [("image" in it and it.get("generate", False)) for it in turns[1]["content"]] == [True])

    def _official_wrappers(self, record: dict, turns: list[dict],
                           draw: Draw) -> tuple[list[dict], dict[int, str]]:
        """The official SFT wrappers, picked per use from (seed, record id, draw): a caption -> image exchange
        asks with one of ``GEN_PROMPTS`` and the matching response leads the answer unsupervised
        (``gen_prompts``); an edit answer that is only the generated image gets one of ``EDIT_RESPONSES``,
        supervised, before it (``edit_responses``). Returns the turns and {turn index: unsupervised lead}."""
        leads: dict[int, str] = {}
        if self.gen_prompts and self._is_generation_request(turns):
            k = int(draw_unit(self.seed, "gen_prompt", record["id"], draw) * len(GEN_PROMPTS))
            caption = " ".join(it["text"].strip() for it in turns[0]["content"])
            turns = [{**turns[0], "content": [{"text": f"{GEN_PROMPTS[k]} {caption}"}]}, turns[1]]
            leads[1] = " " + GEN_PROMPT_RESPONSES[k]
        elif self.edit_responses and any("image" in it and not it.get("generate", False)
                                         for t in turns if t.get("role") == "user" for it in t["content"]):
            out = []
            for i, turn in enumerate(turns):
                content = turn["content"]
                if turn.get("role") == "assistant" and all(it.get("generate", False) for it in content):
                    pick = int(draw_unit(self.seed, "edit_response", record["id"], draw, i) * len(EDIT_RESPONSES))
                    if EDIT_RESPONSES[pick]:
                        turn = {**turn, "content": [{"text": EDIT_RESPONSES[pick]}, *content]}
                out.append(turn)
            turns = out
        return turns, leads

    # ------------------------------------------------------------------------------------------ views
    def image_grid(self, width: int, height: int, item: dict) -> tuple[int, int] | None:
        """(ncols, nrows) of a comprehension image's tiles; None for a generated image (global view only)."""
        if item.get("generate", False):
            return None
        grid = item.get("grid", "any")
        if grid == "any":
            return select_grid(width, height, self.grids, tile=self.vit_image_size)
        return parse_grid(grid)

    def image_views(self, img, item: dict) -> torch.Tensor:
        """The ViT views of one image item, (n, 3, S, S) in span order: tiles row-major then the global view
        (comprehension), or the one generation view (``generate``)."""
        size = self.vit_image_size
        grid = self.image_grid(img.width, img.height, item)
        if grid is None:  # the any-res global view (official: every SFT config is multi_resolution)
            return vit_view(tile_image(img, 1, 1, tile=size)[-1], size).unsqueeze(0)
        views = tile_image(img, *grid, tile=size)  # tiles row-major, then the global view
        return torch.stack([vit_view(view, size) for view in views])

    def _image_input(self, record: dict, item: dict, k: int,
                     feats) -> tuple[tuple[int, int], int, torch.Tensor]:
        """(width, height) of image item ``k`` as decoded (upright), the EXIF orientation undone to get
        there (the record's boxes are in the stored frame), and its views: pixels, or stored ViT features."""
        if feats is None:
            img = load_image(record, item, min_size=self.min_image_size, max_aspect_ratio=self.max_aspect_ratio)
            return img.size, img.info[ORIENTATION_KEY], self.image_views(img, item)
        w, h = feats.size(k)
        check_image_size(w, h, f"image {item['image']!r}", self.min_image_size, self.max_aspect_ratio)
        grid = self.image_grid(w, h, item)
        views = feats.gen(k).unsqueeze(0) if grid is None else feats.cmp(k, grid[0] * grid[1] + 1)
        return (w, h), feats.orientation(k), views

    def _build(self, record: dict, t2i: bool | None = None, draw: Draw = None,
               prompt: bool = False) -> dict[str, Any]:
        for i, turn in enumerate(record["turns"]):
            for j, item in enumerate(turn["content"]):
                if "text" in item:
                    self._check_text(item["text"], f"turns[{i}].content[{j}].text")
                elif "image" in item and (why := grid_refusal(item, self.grids)):  # before any pixel work
                    raise BadSample("grid_not_allowed", f"turns[{i}].content[{j}]: {why}")
        # After the text checks, so a record skips with the same reason either way; text-only: no entry.
        feats = self.features.load(record) if self.features is not None and record_images(record) else None

        # 1) a flat list of pieces: ("text", str, supervised) | ("image", item, supervised) | ("box", ...)
        pieces: list[tuple[str, Any, bool]] = []
        seen_dialogue = False
        turns, chat = self._turns(record, t2i, draw)
        turns, leads = self._official_wrappers(record, turns, draw)
        for t, turn in enumerate(turns):
            role = turn.get("role")
            supervised = role in (None, "assistant")
            if t in leads:
                pieces.append(("text", leads[t], False))
            if role == "user":
                if seen_dialogue:
                    pieces.append(("text", chat.turn_sep, False))
                pieces.append(("text", chat.user_prefix, False))
            for item in turn["content"]:
                if "text" in item:
                    pieces.append(("text", item["text"], supervised))
                elif "image" in item:
                    pieces.append(("image", item, supervised))
                else:
                    pieces.append(("box", item, supervised))
            if role == "user":
                pieces.append(("text", chat.user_suffix, False))
            elif role == "system":
                pieces.append(("text", chat.system_suffix, False))
            if role in ("user", "assistant"):
                seen_dialogue = True

        # 2) segments: merge adjacent text pieces with the same supervision, build spans from ids
        segments: list[_Segment] = []
        last_size: tuple[int, int] | None = None
        last_orientation = 1
        n_images = 0  # image items so far = the item's index in record order (a t2i flip keeps its one image)
        pending_text: list[str] = []
        pending_sup = False

        def flush() -> None:
            if pending_text:
                ids = self.tokenizer.encode("".join(pending_text), add_special_tokens=False)
                if ids:
                    segments.append(_Segment(list(ids), list(ids) if pending_sup else [IGNORE_INDEX] * len(ids)))
                pending_text.clear()

        for kind, value, supervised in pieces:
            if kind == "text":
                if pending_text and supervised != pending_sup:
                    flush()
                pending_sup = supervised
                pending_text.append(value)
                continue
            flush()
            if kind == "image":
                last_size, last_orientation, views = self._image_input(record, value, n_images, feats)
                n_images += 1
                segments.append(self._image_segment(last_size, value, supervised, views))
            else:
                if value.get("canvas") is not None:  # a layout box on its own page (slides)
                    q = quantize_box(value["box"], *value["canvas"])
                elif last_size is None:
                    raise BadSample("box_without_image", f"box {value['box']!r} has no image before it")
                else:
                    # The box is in the stored pixel frame; the image was turned upright, so turn the box too.
                    stored = oriented_size(*last_size, last_orientation)
                    q = quantize_box(orient_box(value["box"], *stored, last_orientation), *last_size)
                ids = [self.tok.box_start, *(self.tok.loc[v] for v in q), self.tok.box_end]
                segments.append(_Segment(ids, list(ids) if supervised else [IGNORE_INDEX] * len(ids),
                                         atomic=True))
        flush()

        # 3) assemble (with truncation; a prompt is never cut, prompt() drops whole turns instead)
        return self._assemble(record, segments, cut=not prompt)

    def _span(self, start: int, end: int, start_label: int, gen: bool) -> tuple[list[int], list[int],
                                                                                list[bool], list[bool]]:
        n = self.num_image_tokens
        ids = [start, *self.slot_ids, end]
        labels = [start_label] + [IGNORE_INDEX] * (n + 1)
        inner = [False] + [True] * n + [False]
        none = [False] * (n + 2)
        return ids, labels, (none if gen else inner), (inner if gen else none)

    def _image_segment(self, img_size: tuple[int, int], item: dict, supervised: bool,
                       views: torch.Tensor) -> _Segment:
        seg = _Segment([], [], image=True, atomic=True)
        grid = self.image_grid(*img_size, item)
        if grid is None:
            ids, labels, cmp, gen = self._span(self.tok.img_start, self.tok.img_end,
                                               self.tok.img_start if supervised else IGNORE_INDEX, gen=True)
            seg.ids, seg.labels, seg.cmp, seg.gen = ids, labels, cmp, gen
            seg.views.append(views[0])
            seg.view_is_gen.append(True)
            seg.positions.append((0.5, 0.5))
            seg.view_info.append({"kind": "global", "role": "generate", "grid": None})
            return seg
        ncols, nrows = grid
        for k, (view, pos) in enumerate(zip(views, tile_positions(ncols, nrows))):
            is_global = k == len(views) - 1
            start, end = ((self.tok.img_start, self.tok.img_end) if is_global
                          else (self.tok.patch_start, self.tok.patch_end))
            ids, labels, cmp, gen = self._span(start, end, IGNORE_INDEX, gen=False)
            seg.ids += ids
            seg.labels += labels
            seg.cmp += cmp
            seg.gen += gen
            seg.views.append(view)
            seg.view_is_gen.append(False)
            seg.positions.append(tuple(float(p) for p in pos))
            seg.view_info.append({"kind": "global" if is_global else "tile", "role": "input",
                                  "grid": f"{ncols}x{nrows}"})
        return seg

    def _assemble(self, record: dict, segments: list[_Segment], cut: bool = True) -> dict[str, Any]:
        supervised = any(lab != IGNORE_INDEX for s in segments for lab in s.labels)
        total = 1 + sum(len(s.ids) for s in segments) + 1
        truncated = False
        if total > self.max_length:
            if self.truncation == "skip" or not cut:
                raise BadSample("too_long", f"{total} tokens > max_length={self.max_length} (truncation=skip)")
            budget = self.max_length - 1  # BOS; a cut sample gets no EOS (its text goes on)
            kept: list[_Segment] = []
            for s in segments:
                if len(s.ids) <= budget:
                    kept.append(s)
                    budget -= len(s.ids)
                    continue
                if not s.atomic and budget > 0:
                    kept.append(_Segment(s.ids[:budget], s.labels[:budget]))
                break
            n_images = sum(s.image for s in segments)
            if n_images and not any(s.image for s in kept):
                raise BadSample("too_long", f"{total} tokens > max_length={self.max_length} and the first "
                                            f"image does not fit")
            segments, truncated = kept, True
            if supervised and not any(lab != IGNORE_INDEX for s in kept for lab in s.labels):
                raise BadSample("no_supervised_token", f"{total} tokens cut to max_length={self.max_length} "
                                                       f"leave no position with a loss")

        ids = [self.bos_id]
        labels = [IGNORE_INDEX]
        cmp = [False]
        gen = [False]
        views: list[torch.Tensor] = []
        view_is_gen: list[bool] = []
        positions: list[tuple[float, float]] = []
        view_info: list[dict] = []
        for s in segments:
            ids += s.ids
            labels += s.labels
            cmp += s.cmp
            gen += s.gen
            views += s.views
            view_is_gen += s.view_is_gen
            positions += s.positions
            view_info += s.view_info
        if not truncated:
            ids.append(self.eos_id)
            labels.append(self.eos_id if supervised else IGNORE_INDEX)
            cmp.append(False)
            gen.append(False)

        size = self.vit_image_size
        is_gen = torch.tensor(view_is_gen, dtype=torch.bool)
        if self.features is not None:
            view_key, empty = "vit_features", self.features.empty_views()
        else:
            view_key, empty = "vit_pixels", torch.zeros(0, 3, size, size)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "ids_cmp_mask": torch.tensor(cmp, dtype=torch.bool),
            "ids_gen_mask": torch.tensor(gen, dtype=torch.bool),
            view_key: torch.stack(views) if views else empty,
            "embeds_cmp_mask": ~is_gen,
            "embeds_gen_mask": is_gen,
            "patch_positions": torch.tensor(positions, dtype=torch.float32).reshape(-1, 2),
            "id": record["id"],
            "source": record["source"],
            "truncated": truncated,
            "views": view_info,
        }
