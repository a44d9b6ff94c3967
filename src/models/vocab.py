"""SEED-X special tokens, tokenizer extension and the image-token layout in the text stream.

The one vocabulary of the SEED-X tokens: the datamodule extends its tokenizer and builds spans with it,
the model sizes and initialises its new embedding rows with it. It lives beside the models because the
model must not depend on the data package (tests/test_layering.py); data may import it.

Token order (fixed; it decides the new ids, 32000..32329 on Llama-2):

    <img>, </img>, <patch>, </patch>,      4 image markers
    <img_00000> ... <img_00099>,           100 image slots (the first 64 are used)
    <loc-0> ... <loc-223>,                 224 box coordinates
    <box_start>, <box_end>                 2 box markers

330 tokens in all, matching the official vocab of 32330. The official tokenizer files are not public, so
this order is our choice; official checkpoints ship their own tokenizer and must be used with it.

The tokens are added as ordinary (non-"special") added tokens: they are never split, each encodes as one
id, and ``decode(skip_special_tokens=True)`` keeps them, so box spans survive decoding (the official
pipeline decodes with ``skip_special_tokens=False`` and strips ``<...>`` itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import AddedToken

IMG_START = "<img>"
IMG_END = "</img>"
PATCH_START = "<patch>"
PATCH_END = "</patch>"
IMG_TOKEN = "<img_{:05d}>"
LOC_TOKEN = "<loc-{}>"
BOX_START = "<box_start>"
BOX_END = "<box_end>"

NUM_IMG_TOKENS = 100  # slots in the vocabulary
NUM_IMG_TOKENS_USED = 64  # slots one image view occupies (the resampler's 64 queries)
NUM_LOC_TOKENS = 224  # box grid size

SEEDX_TOKENS: tuple[str, ...] = (
    (IMG_START, IMG_END, PATCH_START, PATCH_END)
    + tuple(IMG_TOKEN.format(i) for i in range(NUM_IMG_TOKENS))
    + tuple(LOC_TOKEN.format(i) for i in range(NUM_LOC_TOKENS))
    + (BOX_START, BOX_END)
)
NUM_SEEDX_TOKENS = len(SEEDX_TOKENS)  # 330

_SPAN_MARKERS = {"img": (IMG_START, IMG_END), "patch": (PATCH_START, PATCH_END)}


def add_seedx_tokens(tokenizer) -> int:
    """Add the SEED-X tokens missing from ``tokenizer`` (in the fixed order); return how many were added.

    Idempotent: a second call adds nothing and returns 0.
    """
    vocab = tokenizer.get_vocab()
    missing = [
        AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
        for t in SEEDX_TOKENS
        if t not in vocab
    ]
    if not missing:
        return 0
    return tokenizer.add_tokens(missing)


@dataclass(frozen=True)
class SeedXTokenIds:
    """Ids of the SEED-X tokens in one tokenizer."""

    img_start: int
    img_end: int
    patch_start: int
    patch_end: int
    img: tuple[int, ...]  # all NUM_IMG_TOKENS slots; a view uses the first NUM_IMG_TOKENS_USED
    loc: tuple[int, ...]
    box_start: int
    box_end: int


def image_token_ids(tokenizer) -> SeedXTokenIds:
    """Look up every SEED-X token id; raises ValueError if the tokenizer was not extended."""
    vocab = tokenizer.get_vocab()
    absent = [t for t in SEEDX_TOKENS if t not in vocab]
    if absent:
        raise ValueError(
            f"tokenizer: {len(absent)} SEED-X tokens missing (e.g. {absent[0]!r}); call add_seedx_tokens first"
        )
    return SeedXTokenIds(
        img_start=vocab[IMG_START],
        img_end=vocab[IMG_END],
        patch_start=vocab[PATCH_START],
        patch_end=vocab[PATCH_END],
        img=tuple(vocab[IMG_TOKEN.format(i)] for i in range(NUM_IMG_TOKENS)),
        loc=tuple(vocab[LOC_TOKEN.format(i)] for i in range(NUM_LOC_TOKENS)),
        box_start=vocab[BOX_START],
        box_end=vocab[BOX_END],
    )


@torch.no_grad()
def init_new_embeddings(model, old_vocab_size: int) -> None:
    """Initialise rows ``old_vocab_size:`` of a resized causal LM like official ``peft_models.py``.

    Call after ``model.resize_token_embeddings(new_size)``. New input-embedding rows get the mean of the old
    rows; new output (lm_head) rows get 3x the mean of the old output rows, which makes the new tokens
    somewhat likely at first so their logits get gradient. As officially, the lm_head is left alone when
    it shares its weight with the input embedding. Means are taken in float32, then cast back.
    """
    inp = model.get_input_embeddings().weight
    new_vocab_size = inp.shape[0]
    if not 0 < old_vocab_size <= new_vocab_size:
        raise ValueError(f"old_vocab_size: must be in [1, {new_vocab_size}], got {old_vocab_size}")
    if old_vocab_size == new_vocab_size:
        return
    inp[old_vocab_size:] = inp[:old_vocab_size].float().mean(dim=0, keepdim=True).to(inp.dtype)

    out_module = model.get_output_embeddings()
    if out_module is None:
        return
    out = out_module.weight
    tied = out is inp or out.data_ptr() == inp.data_ptr()
    if tied:
        return
    if out.shape[0] != new_vocab_size:
        raise ValueError(
            f"model: lm_head has {out.shape[0]} rows but embeddings {new_vocab_size}; resize both"
        )
    out[old_vocab_size:] = (3.0 * out[:old_vocab_size].float().mean(dim=0, keepdim=True)).to(out.dtype)


def image_span_text(kind: str, n: int = NUM_IMG_TOKENS_USED) -> str:
    """One image view: ``<patch><img_00000>...</patch>`` (a tile) or ``<img>...</img>`` (global view)."""
    if kind not in _SPAN_MARKERS:
        raise ValueError(f"kind: expected 'patch' or 'img', got {kind!r}")
    if not 1 <= n <= NUM_IMG_TOKENS:
        raise ValueError(f"n: must be in [1, {NUM_IMG_TOKENS}], got {n}")
    start, end = _SPAN_MARKERS[kind]
    return start + "".join(IMG_TOKEN.format(i) for i in range(n)) + end


def image_sequence_text(ncols: int, nrows: int, n: int = NUM_IMG_TOKENS_USED) -> str:
    """Text for a dynamic-resolution input image: a ``<patch>`` span per tile (row-major), then the
    ``<img>`` span of the global view.

    As officially (``process_anyres_image`` always returns tiles + global view), a 1x1 grid still has one
    ``<patch>`` span before the ``<img>`` span. A generated image is only an ``<img>`` span
    (``image_span_text("img")``).
    """
    if ncols < 1 or nrows < 1:
        raise ValueError(f"ncols/nrows: must be >= 1, got {ncols}x{nrows}")
    return image_span_text("patch", n) * (ncols * nrows) + image_span_text("img", n)


# ---- SEED-LLaMA: discrete image codes in the vocabulary -------------------------------------------------
# The SEED tokenizer's 8192 codes as tokens <img_00000> ... <img_08191> (ids 32000..40191 on Llama-2, in code
# order), then the image markers <img>, </img> (40192, 40193). An image is <img> + its 32 codes + </img>.
NUM_IMAGE_CODES = 8192
CODES_PER_IMAGE = 32
SEED_LLAMA_TOKENS: tuple[str, ...] = tuple(IMG_TOKEN.format(i) for i in range(NUM_IMAGE_CODES)) + (IMG_START, IMG_END)


def add_seed_llama_tokens(tokenizer) -> int:
    """Add the SEED-LLaMA tokens missing from ``tokenizer`` (codes in code order, then the markers); idempotent."""
    vocab = tokenizer.get_vocab()
    missing = [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
               for t in SEED_LLAMA_TOKENS if t not in vocab]
    return tokenizer.add_tokens(missing) if missing else 0


@dataclass(frozen=True)
class SeedLlamaTokenIds:
    """Ids of the SEED-LLaMA tokens in one tokenizer, and the code <-> id maps."""

    img_start: int
    img_end: int
    codes: tuple[int, ...]  # token id of code c at index c

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes (any shape, 0..8191) -> their token ids."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(self.codes)):
            raise ValueError(f"image codes must be in [0, {len(self.codes)}), got {int(codes.min())}..{int(codes.max())}")
        return torch.tensor(self.codes, dtype=torch.long, device=codes.device)[codes.long()]

    def codes_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> image codes, -1 where an id is not an image code (text, markers, pad)."""
        table = torch.full((max(max(self.codes), int(ids.max()) if ids.numel() else 0) + 1,), -1, dtype=torch.long,
                           device=ids.device)
        table[torch.tensor(self.codes, device=ids.device)] = torch.arange(len(self.codes), device=ids.device)
        return table[ids.clamp(min=0)].masked_fill(ids < 0, -1)

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes_of(ids) >= 0


def seed_llama_token_ids(tokenizer) -> SeedLlamaTokenIds:
    """Look up every SEED-LLaMA token id; raises ValueError if the tokenizer was not extended."""
    vocab = tokenizer.get_vocab()
    absent = [t for t in SEED_LLAMA_TOKENS if t not in vocab]
    if absent:
        raise ValueError(f"tokenizer: {len(absent)} SEED-LLaMA tokens missing (e.g. {absent[0]!r}); call "
                         f"add_seed_llama_tokens first")
    return SeedLlamaTokenIds(img_start=vocab[IMG_START], img_end=vocab[IMG_END],
                             codes=tuple(vocab[IMG_TOKEN.format(i)] for i in range(NUM_IMAGE_CODES)))
