"""Trained models for inference, from the model specs (src/specs): no training stage, no Lightning.

A model is built from its stage's constructor arguments (a resolved `stage` node, or a checkpoint's
`hyper_parameters`: what it was trained with, so the frozen towers come back equal) and filled from a
checkpoint: our Lightning `.ckpt` (lean: trainable weights only; the frozen ones come back from the config's
weight paths or seeded init, exactly as on resume) or a sharded checkpoint directory (FSDP2 /
`torch.distributed.checkpoint`, read here in one process). Keys are checked as on resume: a missing trainable
key or an unexpected one is named. Which stage wrote a checkpoint is its `stage_name` (older checkpoints:
the spec's legacy guess). `src.generate`, `src.export`, `src.eval`, `src.lmms` and data_prep use these, then
hand plain modules to src/pipelines.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.pipelines.detok import ImageDecoder
from src.specs.base import load_checkpoint_into
from src.specs.detokenizer import DETOKENIZER, DetokModel
from src.specs.seed_llama import SEED_LLAMA, SeedLlamaModel
from src.specs.seed_tokenizer import SEED_TOKENIZER, SeedTokenizerModel
from src.specs.seedx import SEEDX, SeedXModel
from src.utils.checkpoint import read_checkpoint
from src.utils.checkpoint_kind import check_checkpoint_kind

__all__ = ["build_detokenizer", "build_image_tokenizer", "build_mllm", "build_seed_llama", "checkpoint_hparams",
           "compose_experiment", "detok_stage_of", "image_decoder_of", "load_checkpoint_into", "read_checkpoint"]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def checkpoint_hparams(checkpoint: dict, path: str | Path, key: str = "ckpt_path") -> dict:
    """The stage constructor arguments the checkpoint was trained with (`hyper_parameters`)."""
    hp = checkpoint.get("hyper_parameters")
    if not hp:
        raise ValueError(f"{key}={str(path)!r} holds no hyper_parameters (not a checkpoint of src.train)")
    return copy.deepcopy(dict(hp))


def detok_stage_of(checkpoint: dict) -> str:
    """`stage1` or `stage2`: the checkpoint's `stage_name`, or (legacy: written before it was stored) `stage2`
    for a checkpoint whose hyper-parameters take the condition-image drop rate (seedx_detok_cond)."""
    return DETOKENIZER.stage_of(checkpoint)


def _with_pretrained_start(stage_cfg: dict, checkpoint: dict | None) -> dict:
    """An SFT checkpoint rebuilds the pre-trained start it trained on (its own init_from) unless told otherwise."""
    cfg = {k: v for k, v in copy.deepcopy(dict(stage_cfg)).items() if k != "_target_"}
    hp = (checkpoint or {}).get("hyper_parameters") or {}
    if hp.get("init_from") and not cfg.get("init_from"):
        cfg.update(init_from=hp["init_from"], pretrain_lora=hp.get("pretrain_lora", "merge"))
    return cfg


def build_mllm(stage_cfg: dict, ckpt_path: str | None = None, checkpoint: dict | None = None) -> SeedXModel:
    """The SEED-X MLLM of `stage_cfg` (a resolved `stage` node or a checkpoint's hyper-parameters), built,
    weights loaded (`checkpoint`: `ckpt_path` already read), eval mode. An SFT stage (`init_from` in the
    config) rebuilds its pre-trained start first: the checkpoint holds what trained."""
    if ckpt_path:
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path)
        check_checkpoint_kind(checkpoint, ckpt_path, "ckpt_path", SEEDX.name)
    cfg = _with_pretrained_start(stage_cfg, checkpoint)
    return SEEDX.build("sft" if "init_from" in cfg else "pretrain", cfg, ckpt_path, checkpoint)


def build_seed_llama(stage_cfg: dict, ckpt_path: str | None = None, checkpoint: dict | None = None) -> SeedLlamaModel:
    """SEED-LLaMA of `stage_cfg`, as `build_mllm` builds SEED-X (an SFT stage rebuilds its start first)."""
    if ckpt_path:
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path)
        check_checkpoint_kind(checkpoint, ckpt_path, "ckpt_path", SEED_LLAMA.name)
    cfg = _with_pretrained_start(stage_cfg, checkpoint)
    return SEED_LLAMA.build("sft" if "init_from" in cfg else "pretrain", cfg, ckpt_path, checkpoint)


def build_detokenizer(model_cfg: dict, stage: str, ckpt_path: str | None = None, negative: str = "official",
                      init_seed: int = 0, checkpoint: dict | None = None) -> DetokModel:
    """A stage-1 (`stage1`) or stage-2 (`stage2`) de-tokenizer, eval mode.

    With `ckpt_path` (our `seedx_detok_*` last.ckpt; `checkpoint`: it already read) the checkpoint's own
    hyper-parameters build it (model config, negative, seeds: what it was trained with, so the frozen
    towers come back equal); else `model_cfg` (`{"vit": ..., "detokenizer": ...}`) with its weight paths
    (official weights: `model.detokenizer.adapter_weights` = the released first/second-stage adapter,
    sampled with the official unconditional branch, `negative=official`)."""
    args = {"model": copy.deepcopy(model_cfg), "negative": negative, "init_seed": init_seed}
    if ckpt_path:
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, "detok_ckpt_path")
        check_checkpoint_kind(checkpoint, ckpt_path, "detok_ckpt_path", DETOKENIZER.name)
        args = checkpoint_hparams(checkpoint, ckpt_path, "detok_ckpt_path")
        if detok_stage_of(checkpoint) != stage:
            want = "a stage-2 (seedx_detok_cond)" if stage == "stage2" else "a stage-1 (seedx_detok_pretrain)"
            raise ValueError(f"detok_ckpt_path={ckpt_path!r}: this mode needs {want} checkpoint")
        # The checkpoint holds the trained adapter: no need for the file stage 2 started from.
        args["model"]["detokenizer"]["adapter_weights"] = None
        args.pop("frozen_dtype", None)  # inference picks its own dtype
    return DETOKENIZER.build(stage, args, ckpt_path, checkpoint, "detok_ckpt_path")


def image_decoder_of(module: DetokModel) -> ImageDecoder:
    """The plain sampling pipeline of a built de-tokenizer (its unconditional branch included)."""
    return module.image_decoder()


def compose_experiment(experiment: str, overrides: list[str] = ()) -> DictConfig:
    """The training config of `experiment=<name>` (+ overrides), as `python -m src.train` composes it; works
    inside another Hydra app (src.generate) and outside one (data_prep)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [f"experiment={experiment}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=args)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=args)


def build_image_tokenizer(ckpt_path: str | None, experiment: str | None, overrides: list[str] = (),
                          keys: tuple[str, str] = ("image_tokenizer.ckpt_path", "image_tokenizer.experiment"),
                          ) -> SeedTokenizerModel:
    """A SEED tokenizer (stage 2, v1 or v2) for inference: from its checkpoint (rebuilt from the checkpoint's own
    hyper-parameters), or (random-init tiny twins) from an experiment's config as it is."""
    checkpoint = None
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path, keys[0])
        check_checkpoint_kind(checkpoint, ckpt_path, keys[0], SEED_TOKENIZER.name)
        stage_cfg = checkpoint_hparams(checkpoint, ckpt_path, keys[0])
    elif experiment:
        stage_cfg = OmegaConf.to_container(compose_experiment(experiment, list(overrides)).stage, resolve=True)
    else:
        raise ValueError(f"set {keys[0]} (a seed_tokenizer_v1/v2 checkpoint) or, for a random-init tiny twin, "
                         f"{keys[1]} (e.g. seed_tokenizer_v2_tiny)")
    return SEED_TOKENIZER.build("stage2", stage_cfg, ckpt_path, checkpoint, keys[0])
