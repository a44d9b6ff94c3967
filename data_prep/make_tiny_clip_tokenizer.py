"""Write the tiny CLIP BPE tokenizer bundled at assets/tokenizers/tiny-clip/ (offline, a few KB).

The SEED tokenizer's tiny twins need a tokenizer laid out like Stable Diffusion's CLIP one (OpenAI's
byte-level BPE with `</w>` word ends) without the 49408-entry vocabulary: ids 0..255 are the byte
characters, 256..511 the same with `</w>`, then a few merges, then `<|startoftext|>` and
`<|endoftext|>` last (as in CLIP, so the text model's legacy argmax(input_ids) still finds the EOT).
Pad = `<|endoftext|>`, model_max_length 77, so captions pad/truncate to SD's 77 positions. The files
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) load with
`transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)` and AutoTokenizer.

    python -m data_prep.make_tiny_clip_tokenizer [--out assets/tokenizers/tiny-clip]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "assets" / "tokenizers" / "tiny-clip"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

# A few of CLIP's own first merges (common English pieces), so the merge path is exercised too.
MERGES = (
    "i n", "t h", "a n", "r e", "a r", "e r", "th e</w>", "in g</w>", "o u", "o n", "s t", "o r",
    "e n", "o n</w>", "a l", "a t", "e r</w>", "i t", "i n</w>", "t o</w>", "r o", "i s</w>",
    "l e", "i c", "a t</w>", "an d</w>", "e d</w>", "o f</w>", "c h", "o r</w>",
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
    "model_max_length": MAX_LENGTH,
    "do_lower_case": True,
    "clean_up_tokenization_spaces": False,
    "model_input_names": ["input_ids", "attention_mask"],
}


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_vocab() -> tuple[dict[str, int], list[str]]:
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    for merge in MERGES:
        left, right = merge.split(" ")
        if left not in tokens or right not in tokens:
            raise ValueError(f"merge {merge!r}: both parts must already be in the vocabulary")
        tokens.append(left + right)
    tokens += [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate tokens in the tiny CLIP vocabulary")
    return {t: i for i, t in enumerate(tokens)}, list(MERGES)


def write(out: Path) -> int:
    """Write the tokenizer files to `out`; returns the vocabulary size."""
    vocab, merges = build_vocab()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    size = write(args.out)
    from transformers import CLIPTokenizer  # check it loads the way the pipelines load it

    tok = CLIPTokenizer.from_pretrained(str(args.out), local_files_only=True)
    ids = tok("a photo of the dog").input_ids
    kb = sum(p.stat().st_size for p in args.out.iterdir()) / 1024
    print(f"vocab {size} (len {len(tok)}) -> {args.out} ({kb:.0f} KB); 'a photo of the dog' -> {ids}")


if __name__ == "__main__":
    main()
