"""Released Q-Former weights onto this repo's modules: LAVIS / BERT key names -> transformers' Blip2QFormer names.

LAVIS keeps BERT's names (`bert.embeddings.LayerNorm`, `attention.self.query`, ...); transformers'
`Blip2QFormerModel` calls them `layernorm` and `attention.attention.query`; everything else keeps its name.
Used by stage 1 (`model.qformer.weights`: LAVIS `blip2_pretrained.pth`, the released SEED stage 1's start, or
a `bert-base-uncased` state dict) and by `data_prep.convert_seed_tokenizer` (the released tokenizer).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from src.utils.weights import check_keys_and_shapes, load_state_dict_file

log = logging.getLogger(__name__)

__all__ = ["bert_rules", "load_qformer_weights", "rename"]

# sub-module names that are the same on both sides
KEPT = r"attention\.output|crossattention\.output|intermediate_query|output_query|intermediate|output"


def bert_rules(official: str, ours: str) -> list[tuple[str, str]]:
    """(regex, template) pairs from a LAVIS BERT prefix (`Qformer.bert`) to a Blip2QFormerModel prefix."""
    o = re.escape(official)
    return [
        (rf"^{o}\.embeddings\.LayerNorm\.(weight|bias)$", rf"{ours}.layernorm.\1"),
        (rf"^{o}\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)$",
         rf"{ours}.encoder.layer.\1.\2.attention.\3"),
        (rf"^{o}\.encoder\.layer\.(\d+)\.({KEPT})\.(.+)$", rf"{ours}.encoder.layer.\1.\2.\3"),
    ]


def rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        if re.match(pattern, key):
            return re.sub(pattern, template, key)
    return None


# LAVIS Blip2Qformer -> src.models.qformer_pretrain.QFormerPretrainer
STAGE1_RULES = [
    *bert_rules("Qformer.bert", "qformer.qformer"),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight$", r"text_embeddings.\1.weight"),
    (r"^Qformer\.cls\.(.+)$", r"lm_head.\1"),
    (r"^(query_tokens|ln_vision\..+)$", r"qformer.\1"),
    (r"^(vision_proj\..+|text_proj\..+|itm_head\..+|temp)$", r"\1"),
]
# a bare BERT checkpoint (bert-base-uncased): BLIP-2's own initialisation
BERT_PREFIXES = (("bert.", "Qformer.bert."), ("cls.", "Qformer.cls."))
# what BERT lacks and BLIP-2 initialises itself: cross-attention, queries, ln_vision and the ITC/ITM heads
BERT_FRESH = re.compile(r"crossattention\.|^qformer\.(query_tokens|ln_vision)|^(vision_proj|text_proj|itm_head)\.|^temp$")


def load_qformer_weights(module: nn.Module, path: str, key: str = "model.qformer.weights") -> None:
    """Fill a QFormerPretrainer from LAVIS `blip2_pretrained.pth` (strict: every missing, unexpected or
    wrong-shape key named) or a BERT state dict (the query FFN copied from the text FFN, as SEED's stage 1
    does; cross-attention, queries, ln_vision and heads keep their init). The ViT's tensors are skipped."""
    state = load_state_dict_file(path, key)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    is_bert = not any(k.startswith("Qformer.") for k in state)
    if is_bert:
        for bare, lavis in BERT_PREFIXES:
            state = {(lavis + k.removeprefix(bare) if k.startswith(bare) else k): v for k, v in state.items()}
        for k in list(state):  # SEED / BLIP-2: the query FFN starts as a copy of the text FFN
            m = re.match(r"^(Qformer\.bert\.encoder\.layer\.\d+\.)(intermediate|output)\.(.+)$", k)
            if m:
                state.setdefault(f"{m.group(1)}{m.group(2)}_query.{m.group(3)}", state[k].clone())
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mapped, unknown = {}, []
    for k, v in state.items():
        if k.startswith(("visual_encoder.", "Qformer.cls.seq_relationship")) or k.endswith("position_ids"):
            continue
        ours = rename(k, STAGE1_RULES)
        if ours is None:
            unknown.append(k)
        elif ours in own:
            mapped[ours] = v
        elif not ours.startswith(("lm_head.", "itm_head.")):  # heads the configured losses do not build
            unknown.append(k)
    # the LM head's decoder is tied to the word embeddings (one tensor, two names)
    if "lm_head.predictions.decoder.weight" in own:
        mapped.setdefault("lm_head.predictions.decoder.weight", mapped.get("text_embeddings.word_embeddings.weight"))
    fresh = sorted(k for k in own if k not in mapped and is_bert and BERT_FRESH.search(k))
    given = {k: tuple(v.shape) for k, v in mapped.items() if v is not None}
    check_keys_and_shapes({k: s for k, s in own.items() if k not in fresh},
                          {**given, **{k: (0,) for k in unknown}},
                          f"{key} ({path}) does not match the stage-1 Q-Former:", "checkpoint")
    module.load_state_dict({**module.state_dict(), **{k: v.to(torch.float32) for k, v in mapped.items()
                                                      if v is not None}})
    log.info("%s=%s: %d tensors loaded (%s)%s", key, path, len(given), "BERT" if is_bert else "BLIP-2",
             f"; initialised here: {', '.join(fresh)}" if fresh else "")
