"""The diffusion decoders behind the SEED image tokenizers and the frozen encoders whose outputs they regress.

SEED tokenizer v2 (SEED-LLaMA) regresses the 1024-d CLIP-H image embedding that SD 2.1 unCLIP takes as
`image_embeds` (kind "unclip"); v1 regresses SD v1.4's 77 x 768 CLIP-L text states (kind "sd"). Training
needs the encoder out of the same pipeline folder, so both are built here from one config: the
architecture from config dicts (meta device works, nothing is read), weights only from `pretrained_dir`
(local files, never downloaded). Random-init builds are seeded per component, so a tiny twin's target
encoder equals the encoder inside its tiny pipeline on every build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from src.utils.constraints import PositiveInt
from src.utils.materialize import seeded
from src.utils.weights import MissingWeightsError, RequiredPath, check_paths, missing_weights_error

KEY = "model.seed_decoder"
KINDS = {
    "unclip": "SD 2.1 unCLIP (StableUnCLIPImg2ImgPipeline; SEED tokenizer v2)",
    "sd": "Stable Diffusion v1.4 (StableDiffusionPipeline; SEED tokenizer v1)",
}


@dataclass
class SeedDecoderConfig:
    kind: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]  # the sampler's scheduler_config.json (`_class_name` picks the class)
    text_encoder: dict[str, Any]  # CLIPTextConfig: the prompt encoder (kind sd: also the target)
    image_encoder: dict[str, Any] | None = None  # CLIPVisionConfig with projection_dim (kind unclip: the target)
    image_noising_scheduler: dict[str, Any] | None = None  # unCLIP's noise augmentation of image_embeds
    resolution: PositiveInt = 512
    pretrained_dir: str | None = None
    tokenizer: str | None = None  # a local CLIP tokenizer folder, used only without pretrained_dir
    allow_random_init: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{KEY}.kind={self.kind!r} must be one of: "
                             + ", ".join(f"'{k}' ({v})" for k, v in KINDS.items()))
        if not self.text_encoder:
            raise ValueError(f"{KEY}.text_encoder: a CLIPTextConfig dict is required (the pipeline encodes prompts)")
        self.text_config = CLIPTextConfig(**self.text_encoder)
        cross = self.unet.get("cross_attention_dim")
        if cross != self.text_config.hidden_size:
            raise ValueError(f"{KEY}.unet.cross_attention_dim={cross} must equal text_encoder.hidden_size="
                             f"{self.text_config.hidden_size} (the UNet cross-attends to the text states)")
        class_embed = self.unet.get("class_embed_type")
        if self.kind == "unclip":
            self._check_unclip(class_embed)
        else:
            self.vision_config = None
            if self.image_encoder:
                raise ValueError(f"{KEY}.image_encoder must be null for kind 'sd' (its target is the text encoder)")
            if class_embed is not None:
                raise ValueError(f"{KEY}.unet.class_embed_type must be null for kind 'sd', got {class_embed!r}")
        vsf = self.vae_scale_factor
        if self.resolution % 8 or self.resolution % vsf:
            raise ValueError(f"{KEY}.resolution={self.resolution} must be divisible by 8 and by the VAE "
                             f"downsampling factor {vsf}")
        sample = self.unet.get("sample_size")
        if not isinstance(sample, int) or sample * vsf != self.resolution:
            raise ValueError(f"{KEY}.unet.sample_size={sample} must be resolution / "
                             f"VAE factor = {self.resolution // vsf} (the pipeline's default image size)")
        if "_class_name" not in self.scheduler:
            raise ValueError(f"{KEY}.scheduler._class_name: name the diffusers sampler (e.g. DDIMScheduler)")

    def _check_unclip(self, class_embed: str | None) -> None:
        if not self.image_encoder or "projection_dim" not in self.image_encoder:
            raise ValueError(f"{KEY}.image_encoder: kind 'unclip' needs a CLIPVisionConfig dict with projection_dim")
        if not self.image_noising_scheduler:
            raise ValueError(f"{KEY}.image_noising_scheduler: kind 'unclip' needs the DDPM noise-augmentation "
                             "schedule of image_embeds")
        self.vision_config = CLIPVisionConfig(**self.image_encoder)
        if class_embed != "projection":
            raise ValueError(f"{KEY}.unet.class_embed_type must be 'projection' for kind 'unclip' (image_embeds "
                             f"enter as class labels), got {class_embed!r}")
        want = 2 * self.vision_config.projection_dim
        got = self.unet.get("projection_class_embeddings_input_dim")
        if got != want:
            raise ValueError(f"{KEY}.unet.projection_class_embeddings_input_dim={got} must be 2 x "
                             f"image_encoder.projection_dim = {want} (embedding + its noise-level embedding)")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens the SEED decoder must produce: 1 image embedding, or SD's text positions (77)."""
        return 1 if self.kind == "unclip" else self.text_config.max_position_embeddings

    @property
    def embed_dim(self) -> int:
        """Width of each target token: CLIP image projection_dim, or the text encoder's hidden size."""
        return self.vision_config.projection_dim if self.kind == "unclip" else self.text_config.hidden_size

    @property
    def encoder_image_size(self) -> int | None:
        """Side of the CLIP-normalised pixels the unCLIP target encoder takes (None for kind sd)."""
        return self.vision_config.image_size if self.kind == "unclip" else None

    def required_paths(self) -> list[RequiredPath]:
        """What a weight-loading build reads (shared with the pre-run check)."""
        folder = "stable-diffusion-2-1-unclip" if self.kind == "unclip" else "stable-diffusion-v1-4"
        return [
            RequiredPath(f"{KEY}.pretrained_dir", f"a diffusers {folder} folder (unet/, vae/, text_encoder/, "
                         "tokenizer/, scheduler/...)", self.pretrained_dir, "dir", required=not self.allow_random_init),
            RequiredPath(f"{KEY}.tokenizer", "a local CLIP tokenizer folder (used when pretrained_dir is unset)",
                         self.tokenizer, "dir", required=not self.pretrained_dir and self.allow_random_init),
        ]

    def loads_weights(self, load_weights: bool) -> bool:
        """True: read `pretrained_dir` (checked); False: build from config (allowed for tiny twins only)."""
        if load_weights and not (self.allow_random_init and not self.pretrained_dir):
            check_paths(self.required_paths()[:1])
            return True
        return False


def _built(seed: int, component: str, build):
    """Build under the component's own seed (`src.utils.materialize.seeded`), the caller's RNG untouched."""
    with seeded(seed, component):
        return build()


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_image_encoder(cfg: SeedDecoderConfig, load_weights: bool = True, seed: int = 0
                        ) -> CLIPVisionModelWithProjection:
    if cfg.kind != "unclip":
        raise ValueError(f"{KEY}.kind={cfg.kind!r} has no image encoder")
    if cfg.loads_weights(load_weights):
        return CLIPVisionModelWithProjection.from_pretrained(
            cfg.pretrained_dir, subfolder="image_encoder", local_files_only=True, dtype=torch.float32)
    return _built(seed, "image_encoder", lambda: CLIPVisionModelWithProjection(cfg.vision_config))


def build_text_encoder(cfg: SeedDecoderConfig, load_weights: bool = True, seed: int = 0) -> CLIPTextModel:
    if cfg.loads_weights(load_weights):
        return CLIPTextModel.from_pretrained(
            cfg.pretrained_dir, subfolder="text_encoder", local_files_only=True, dtype=torch.float32)
    return _built(seed, "text_encoder", lambda: CLIPTextModel(cfg.text_config))


def build_unet(cfg: SeedDecoderConfig, load_weights: bool = True, seed: int = 0) -> UNet2DConditionModel:
    if cfg.loads_weights(load_weights):
        return UNet2DConditionModel.from_pretrained(cfg.pretrained_dir, subfolder="unet", local_files_only=True)
    return _built(seed, "unet", lambda: UNet2DConditionModel.from_config(dict(cfg.unet)))


def build_vae(cfg: SeedDecoderConfig, load_weights: bool = True, seed: int = 0) -> AutoencoderKL:
    if cfg.loads_weights(load_weights):
        return AutoencoderKL.from_pretrained(cfg.pretrained_dir, subfolder="vae", local_files_only=True)
    return _built(seed, "vae", lambda: AutoencoderKL.from_config(dict(cfg.vae)))


def build_tokenizer(cfg: SeedDecoderConfig) -> CLIPTokenizer:
    """`<pretrained_dir>/tokenizer` when set, else `tokenizer` (tiny twins); checked against the text vocab."""
    if cfg.pretrained_dir:
        check_paths(cfg.required_paths()[:1])
        tok = CLIPTokenizer.from_pretrained(cfg.pretrained_dir, subfolder="tokenizer", local_files_only=True)
    elif cfg.tokenizer and Path(cfg.tokenizer).is_dir():
        tok = CLIPTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    else:
        raise missing_weights_error(f"{KEY}.tokenizer", "a local CLIP tokenizer folder (or set "
                                    f"{KEY}.pretrained_dir)", cfg.tokenizer)
    if len(tok) > cfg.text_config.vocab_size:
        raise ValueError(f"{KEY}.text_encoder.vocab_size={cfg.text_config.vocab_size} is smaller than the "
                         f"tokenizer's {len(tok)} tokens")
    return tok


class TargetEncoder(nn.Module):
    """The frozen encoder SEED's decoder regresses: `target(pixels=..., captions=...)` -> (B, num_tokens, D).

    unclip: CLIP-H image embeds of CLIP-normalised pixels, (B, 1, 1024); sd: SD's text states of the
    caption padded/truncated to 77 tokens, (B, 77, 768). It stays in eval mode (no dropout drift).
    """

    def __init__(self, kind: str, image_encoder: CLIPVisionModelWithProjection | None = None,
                 text_encoder: CLIPTextModel | None = None, tokenizer: CLIPTokenizer | None = None,
                 num_tokens: int = 77) -> None:
        super().__init__()
        self.kind, self.num_tokens, self.tokenizer = kind, num_tokens, tokenizer
        self.image_encoder = freeze(image_encoder) if image_encoder is not None else None
        self.text_encoder = freeze(text_encoder) if text_encoder is not None else None

    def train(self, mode: bool = True) -> TargetEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values=pixels.to(dtype)).image_embeds.unsqueeze(1)

    @torch.no_grad()
    def forward_text(self, captions: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise missing_weights_error(f"{KEY}.tokenizer", "a local CLIP tokenizer folder (or set "
                                        f"{KEY}.pretrained_dir)")
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.num_tokens, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(input_ids=ids.to(self.text_encoder.device))[0]

    def forward(self, pixels: torch.Tensor | None = None, captions: list[str] | None = None) -> torch.Tensor:
        if self.kind == "unclip":
            if pixels is None:
                raise ValueError("the unclip target encoder needs `pixels` (CLIP-normalised images)")
            return self.forward_image(pixels)
        if captions is None:
            raise ValueError("the sd target encoder needs `captions`")
        return self.forward_text(captions)


def build_target_encoder(cfg: SeedDecoderConfig, load_weights: bool, seed: int = 0) -> TargetEncoder:
    """Frozen target encoder; `load_weights=False` builds from config under `seed` (meta device works)."""
    if cfg.kind == "unclip":
        return TargetEncoder("unclip", image_encoder=build_image_encoder(cfg, load_weights, seed), num_tokens=1)
    text_encoder = build_text_encoder(cfg, load_weights, seed)  # first: a missing pretrained_dir is named
    try:
        tokenizer = build_tokenizer(cfg)
    except MissingWeightsError:
        if load_weights:
            raise
        tokenizer = None  # architecture-only build (e.g. meta-device counting): forward_text says what to set
    return TargetEncoder("sd", text_encoder=text_encoder, tokenizer=tokenizer, num_tokens=cfg.num_tokens)
