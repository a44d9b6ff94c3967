"""Every model spec by family name (the `stage_family` a checkpoint stores, src/utils/checkpoint_kind.py)."""

from __future__ import annotations

from src.specs.base import ModelSpec
from src.specs.detokenizer import DETOKENIZER
from src.specs.seed_llama import SEED_LLAMA
from src.specs.seed_tokenizer import SEED_QFORMER, SEED_TOKENIZER
from src.specs.seedx import SEEDX

SPECS: dict[str, ModelSpec] = {s.name: s for s in (SEEDX, DETOKENIZER, SEED_QFORMER, SEED_TOKENIZER, SEED_LLAMA)}


def spec_of(family: str) -> ModelSpec:
    if family not in SPECS:
        raise KeyError(f"no model spec for family {family!r}; known: {sorted(SPECS)}")
    return SPECS[family]


def model_config_classes() -> dict[str, type]:
    """`model.<node>` -> the dataclass that parses it, over every family (for the config check)."""
    out: dict[str, type] = {}
    for spec in SPECS.values():
        out.update(spec.config_classes)
    return out
