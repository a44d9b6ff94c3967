"""Which stage family wrote a checkpoint, so that a checkpoint of the wrong kind is refused by name before any
model is built (a de-tokenizer checkpoint as an MLLM's `stage.init_from` would otherwise fail deep inside
the build, after the trainer and W&B started).

Every stage writes its model spec's family (``checkpoint["stage_family"]``, src/specs) and its stage's name
within the family (``checkpoint["stage_name"]``, e.g. ``stage2`` of the de-tokenizer) into its checkpoints.
Legacy path: checkpoints written before the family was stored are recognised by the model parts their
hyper-parameters configure; where neither says, the kind is unknown and not refused here (the build's own key
checks still apply). Checkpoints without ``stage_name`` get their stage guessed by the spec
(``ModelSpec.legacy_stage``, e.g. ``"cond_drop_rate" in hparams`` for de-tokenizer stage 2).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FAMILIES", "FAMILY_KEY", "STAGE_KEY", "WrongCheckpointKind", "check_checkpoint_kind", "checkpoint_family",
           "model_family"]

FAMILY_KEY = "stage_family"
STAGE_KEY = "stage_name"  # the stage within the family (src/specs: ModelSpec.stages)
FAMILIES = {
    "seedx_mllm": "a SEED-X MLLM checkpoint (seedx_pretrain, seedx_sft_*)",
    "detokenizer": "a de-tokenizer checkpoint (seedx_detok_pretrain, seedx_detok_cond)",
    "seed_llama": "a SEED-LLaMA checkpoint (seed_llama_pretrain, seed_llama_sft)",
    "seed_qformer": "a SEED tokenizer stage-1 checkpoint (seed_tokenizer_qformer)",
    "seed_tokenizer": "a SEED tokenizer checkpoint (seed_tokenizer_v1, seed_tokenizer_v2)",
}
# Checkpoints without FAMILY_KEY: the first model part (hyper_parameters["model"]) only that family (and the
# ones after it) builds: the SEED-X MLLM also holds a detokenizer config, a SEED tokenizer a qformer.
_MODEL_PARTS = (("agent", "seedx_mllm"), ("detokenizer", "detokenizer"), ("seed_codec", "seed_tokenizer"),
                ("qformer", "seed_qformer"), ("llm", "seed_llama"))


class WrongCheckpointKind(ValueError):
    pass


def model_family(model) -> str | None:
    """The family a `model` config node (an experiment's, or a checkpoint's hyper-parameters') configures."""
    if not hasattr(model, "keys"):
        return None
    return next((family for part, family in _MODEL_PARTS if part in model), None)


def checkpoint_family(checkpoint: dict) -> str | None:
    """The family of the stage that wrote `checkpoint` (a read_checkpoint result); None when unknown."""
    family = checkpoint.get(FAMILY_KEY)
    if isinstance(family, str):
        return family
    return model_family((checkpoint.get("hyper_parameters") or {}).get("model"))


def check_checkpoint_kind(checkpoint: dict, path: str | Path, key: str, expected: str | tuple[str, ...]) -> None:
    """Raise :class:`WrongCheckpointKind` naming `key`, what the checkpoint is and what `key` expects."""
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    found = checkpoint_family(checkpoint)
    if found is None or found in expected:
        return
    wanted = " or ".join(FAMILIES.get(e, e) for e in expected)
    raise WrongCheckpointKind(f"{key}={str(path)!r} is {FAMILIES.get(found, found)}; {key} expects {wanted}")
