"""Trained stages for inference: build a stage's models from its config and fill them from a checkpoint.

A checkpoint is our Lightning `.ckpt` (lean: trainable weights only; the frozen ones come back from the
config's weight paths or seeded init, exactly as on resume) or a sharded checkpoint directory (FSDP2 /
`torch.distributed.checkpoint`, read here in one process). Keys are checked as on resume: a missing
trainable key or an unexpected one is named. `src.generate` and `src.export` use these, then hand
plain modules to src/pipelines.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from src.pipelines.detok import ImageDecoder
from src.stages.base import StageModule
from src.stages.detok_cond import DetokCondModule
from src.stages.detok_pretrain import DetokPretrainModule
from src.stages.mllm_pretrain import MLLMPretrainModule
from src.stages.mllm_sft import MLLMSFTModule
from src.utils.checkpoint import read_checkpoint
from src.utils.checkpoint_kind import check_checkpoint_kind

if TYPE_CHECKING:
    from src.stages.seed_tokenizer import SeedTokenizerModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def checkpoint_hparams(checkpoint: dict, path: str | Path, key: str = "ckpt_path") -> dict:
    """The stage constructor arguments the checkpoint was trained with (`hyper_parameters`)."""
    hp = checkpoint.get("hyper_parameters")
    if not hp:
        raise ValueError(f"{key}={str(path)!r} holds no hyper_parameters (not a checkpoint of src.train)")
    return copy.deepcopy(dict(hp))


def detok_stage_of(hparams: dict) -> str:
    """`stage2` for a seedx_detok_cond checkpoint (its constructor takes the condition-image drop rate)."""
    return "stage2" if "cond_drop_rate" in hparams else "stage1"


def _sharded_state(module: StageModule, path: Path, key: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        dcp.load({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # DCP names the missing entries in its own message
        raise RuntimeError(f"{key}={str(path)!r}: not a sharded checkpoint of this model: {e}") from e
    return state


def load_checkpoint_into(module: StageModule, path: str | Path, key: str = "ckpt_path",
                         checkpoint: dict | None = None) -> dict:
    """Fill a built stage from a checkpoint (read from `path` unless given), strictly: the resume check
    names missing trainable and unexpected keys. Returns the checkpoint."""
    checkpoint = dict(checkpoint if checkpoint is not None else read_checkpoint(path, key))
    if "state_dict" not in checkpoint:  # sharded directory: the tensors, read into the module's layout
        checkpoint["state_dict"] = _sharded_state(module, Path(path), key)
    try:
        module.on_load_checkpoint(checkpoint)
    except RuntimeError as e:
        raise RuntimeError(f"{key}={str(path)!r}: {e}") from None
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return checkpoint


def build_mllm(stage_cfg: dict, ckpt_path: str | None = None, checkpoint: dict | None = None) -> MLLMPretrainModule:
    """The MLLM stage of `stage_cfg` (a resolved `stage` node or a checkpoint's hyper-parameters), built,
    weights loaded (`checkpoint`: `ckpt_path` already read), eval mode."""
    cfg = {k: v for k, v in copy.deepcopy(stage_cfg).items() if k != "_target_"}
    cfg["optimizer"] = None
    if ckpt_path:
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path)
        check_checkpoint_kind(checkpoint, ckpt_path, "ckpt_path", "seedx_mllm")
        hp = checkpoint.get("hyper_parameters") or {}
        if hp.get("init_from") and not cfg.get("init_from"):
            # An SFT checkpoint rebuilds the pre-trained start it trained on (its own init_from) unless told otherwise.
            cfg.update(init_from=hp["init_from"], pretrain_lora=hp.get("pretrain_lora", "merge"))
    # An SFT stage rebuilds its pre-trained start (stage.init_from) first: the checkpoint holds what trained.
    module = (MLLMSFTModule if "init_from" in cfg else MLLMPretrainModule)(**cfg)
    module.build_models(load_weights=True)
    if ckpt_path:
        load_checkpoint_into(module, ckpt_path, checkpoint=checkpoint)
    return module.eval().requires_grad_(False)


def build_detokenizer(model_cfg: dict, stage: str, ckpt_path: str | None = None, negative: str = "official",
                      init_seed: int = 0, checkpoint: dict | None = None) -> DetokPretrainModule:
    """A stage-1 (`stage1`) or stage-2 (`stage2`) de-tokenizer, eval mode.

    With `ckpt_path` (our `seedx_detok_*` last.ckpt; `checkpoint`: it already read) the checkpoint's own
    hyper-parameters build it (model config, negative, seeds: what it was trained with, so the frozen
    towers come back equal); else `model_cfg` (`{"vit": ..., "detokenizer": ...}`) with its weight paths
    (official weights: `model.detokenizer.adapter_weights` = the released first/second-stage adapter,
    sampled with the official unconditional branch, `negative=official`)."""
    cls = DetokCondModule if stage == "stage2" else DetokPretrainModule
    kwargs = {"model": copy.deepcopy(model_cfg), "negative": negative, "init_seed": init_seed}
    if ckpt_path:
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, "detok_ckpt_path")
        check_checkpoint_kind(checkpoint, ckpt_path, "detok_ckpt_path", "detokenizer")
        hp = checkpoint_hparams(checkpoint, ckpt_path, "detok_ckpt_path")
        if detok_stage_of(hp) != stage:
            want = "a stage-2 (seedx_detok_cond)" if stage == "stage2" else "a stage-1 (seedx_detok_pretrain)"
            raise ValueError(f"detok_ckpt_path={ckpt_path!r}: this mode needs {want} checkpoint")
        kwargs = {k: hp[k] for k in ("model", "negative", "init_seed", "noise_seed") if k in hp}
        # The checkpoint holds the trained adapter: no need for the file stage 2 started from.
        kwargs["model"]["detokenizer"]["adapter_weights"] = None
    if cls is DetokCondModule:
        kwargs["require_stage1"] = False
    module = cls(optimizer=None, **kwargs)
    module.build_models(load_weights=True)
    if ckpt_path:
        load_checkpoint_into(module, ckpt_path, "detok_ckpt_path", checkpoint)
    return module.eval().requires_grad_(False)


def image_decoder_of(module: DetokPretrainModule) -> ImageDecoder:
    """The plain sampling pipeline of a built de-tokenizer stage (its unconditional branch included)."""
    return ImageDecoder(module.resampler, module.unet, module.vae, module.noise_scheduler.config,
                        module.negative_features(), module.detok_cfg.resolution)


def build_trained(stage_cls: type[StageModule], stage_cfg: dict, ckpt_path: str | None = None,
                  checkpoint: dict | None = None) -> StageModule:
    """Any stage (a class and its constructor arguments: a resolved `stage` node or a checkpoint's
    hyper-parameters) built with its weights, filled from `ckpt_path` when given (`checkpoint`: it, already
    read), eval mode."""
    cfg = {k: v for k, v in copy.deepcopy(dict(stage_cfg)).items() if k != "_target_"}
    cfg["optimizer"] = None
    module = stage_cls(**cfg)
    module.build_models(load_weights=True)
    if ckpt_path:
        load_checkpoint_into(module, ckpt_path, checkpoint=checkpoint)
    return module.eval().requires_grad_(False)


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
                          ) -> SeedTokenizerModule:
    """A SEED tokenizer (stage 2, v1 or v2) for inference: from its checkpoint (rebuilt from the checkpoint's own
    hyper-parameters), or (random-init tiny twins) from an experiment's config as it is."""
    from src.stages.seed_tokenizer import SeedTokenizerModule

    checkpoint = None
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path, keys[0])
        check_checkpoint_kind(checkpoint, ckpt_path, keys[0], "seed_tokenizer")
        stage_cfg = checkpoint_hparams(checkpoint, ckpt_path, keys[0])
    elif experiment:
        stage_cfg = OmegaConf.to_container(compose_experiment(experiment, list(overrides)).stage, resolve=True)
    else:
        raise ValueError(f"set {keys[0]} (a seed_tokenizer_v1/v2 checkpoint) or, for a random-init tiny twin, "
                         f"{keys[1]} (e.g. seed_tokenizer_v2_tiny)")
    return build_trained(SeedTokenizerModule, stage_cfg, ckpt_path, checkpoint)
