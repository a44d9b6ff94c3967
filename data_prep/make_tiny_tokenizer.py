"""Build the tiny Llama-2-like tokenizer bundled at assets/tokenizers/tiny-llama/ (offline).

Tests and tiny CPU runs need a tokenizer that behaves like Llama-2's (ids <unk>=0, <s>=1, </s>=2, the 256
byte-fallback tokens <0x00>..<0xFF> at 3..258, "▁" word marks, BOS added automatically) but is small
enough to commit. We train a byte-fallback BPE with the `tokenizers` library on English text built into
this script plus the Zen of Python, and lay it out exactly like transformers' `LlamaTokenizer` pipeline
(no normalizer, Metaspace "first" pre-tokenizer, Replace/ByteFallback/Fuse/Strip decoder), so the file
loads the same through `AutoTokenizer.from_pretrained(path)`.

    python -m data_prep.make_tiny_tokenizer [--out assets/tokenizers/tiny-llama] [--vocab-size 1000]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "assets" / "tokenizers" / "tiny-llama"
SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))

# Captions, instructions and answers in the style of the SEED-X training data.
# fmt: off
_SUBJECTS = (
    "a dog", "a small cat", "two children", "an old man", "a young woman", "a red car", "a wooden boat",
    "a bowl of fruit", "a tall building", "a group of people", "a white horse", "a city street",
    "a mountain lake", "a cup of coffee", "a green bird", "a bicycle", "a loaf of bread", "the moon",
)
_ACTIONS = (
    "sitting on", "standing next to", "running across", "lying under", "looking at", "walking along",
    "parked in front of", "floating on", "hanging above", "resting beside",
)
_PLACES = (
    "a sunny beach", "the kitchen table", "a snowy field", "the river", "a busy market", "an empty road",
    "the garden", "a quiet park", "the window", "a stone bridge", "the night sky", "a forest path",
)
_STYLES = (
    "in the style of an oil painting", "as a watercolor sketch", "in soft morning light", "at sunset",
    "in black and white", "with a blurred background", "in high detail", "as a cartoon drawing",
)
# fmt: on
_TEMPLATES = (
    "A photo of {s} {a} {p}.",
    "{S} {a} {p} {st}.",
    "Please generate an image of {s} {a} {p}.",
    "Can you draw a picture of {s} {st}?",
    "Make the sky pink and add {s} {a} {p}.",
    "What is {s} doing in this image? It is {a} {p}.",
    "Describe the image in detail. There is {s} {a} {p}, and the scene is shown {st}.",
    "Where is {s}? Show me the location of {s} in the picture.",
    "Here is a picture of {s} {a} {p}.",
    "Replace {s} with {s2} and keep the rest of the image the same.",
)
_FREE_TEXT = """\
The quick brown fox jumps over the lazy dog.
Question: How many animals are in the picture? Answer: There are three animals.
Question: What color is the car? Answer: The car is red.
Sure, here is a picture. I have generated an image for you. Enjoy this illustration.
Of course! Let me know if you would like me to change anything else in the image.
Slides should have a short title, three bullet points and one image that matches the topic.
Once upon a time a little bear lived in a house at the edge of the forest.
Every morning the bear walked to the river to catch fish for breakfast.
One day it met a fox who asked the way to the old mill on the hill.
The model reads text and images, answers questions, finds objects and creates new pictures.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in captions, prices and dates.
Punctuation matters: commas, periods, question marks? exclamation marks! and "quotes" (too).
"""


def corpus_lines() -> list[str]:
    """Deterministic English training text (a few hundred lines)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this  # ROT13-encoded text in this.s

    lines = []
    for i, template in enumerate(_TEMPLATES):
        for j, subject in enumerate(_SUBJECTS):
            k = i * len(_SUBJECTS) + j
            lines.append(
                template.format(
                    s=subject,
                    S=subject[0].upper() + subject[1:],
                    s2=_SUBJECTS[(j + 5) % len(_SUBJECTS)],
                    a=_ACTIONS[k % len(_ACTIONS)],
                    p=_PLACES[(k * 7) % len(_PLACES)],
                    st=_STYLES[(k * 3) % len(_STYLES)],
                )
            )
    lines += _FREE_TEXT.splitlines()
    lines += codecs.decode(this.s, "rot13").splitlines()
    return [line for line in lines if line.strip()]


def _metaspace() -> pre_tokenizers.Metaspace:
    # transformers' LlamaTokenizer (legacy=False): "▁" for spaces, one prepended at the very start only.
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)


def train_bpe(lines: list[str], vocab_size: int) -> Tokenizer:
    """Byte-fallback BPE with Llama-2's id layout: specials, then 256 byte tokens, then learnt pieces."""
    # Train on words split at "▁" so no merge crosses a word boundary (like sentencepiece).
    trainer_tok = Tokenizer(BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    n_reserved = len(SPECIALS) + len(BYTE_TOKENS)
    trainer = BpeTrainer(vocab_size=vocab_size - n_reserved, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(lines, trainer=trainer)
    learnt = json.loads(trainer_tok.to_str())["model"]

    vocab = {tok: i for i, tok in enumerate(SPECIALS + BYTE_TOKENS)}
    for tok, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(list(SPECIALS))  # already in vocab: marks them special, keeps ids 0..2
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


# Loaded as transformers' Llama tokenizer (which keeps our tokenizer.json pipeline). Like Llama-2 there is
# no pad token: collators must choose one, so code tested here also works on the real tokenizer.
LLAMA_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "padding_side": "right",
}


def save(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) via transformers."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        out.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tmp) / name
            if src.exists():
                shutil.copy(src, out / name)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(LLAMA_CONFIG)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args()
    if args.vocab_size <= len(SPECIALS) + len(BYTE_TOKENS):
        raise ValueError(f"vocab-size: must exceed {len(SPECIALS) + len(BYTE_TOKENS)}, got {args.vocab_size}")
    lines = corpus_lines()
    tok = train_bpe(lines, args.vocab_size)
    save(tok, args.out)
    size_kb = sum(p.stat().st_size for p in args.out.iterdir()) / 1024
    print(f"{len(lines)} lines -> vocab {tok.get_vocab_size()} -> {args.out} ({size_kb:.0f} KB)")


if __name__ == "__main__":
    main()
