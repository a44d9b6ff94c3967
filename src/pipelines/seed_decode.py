"""Decode SEED tokenizer embeddings to images with the diffusers pipeline they were regressed for.

unclip (SEED v2): `StableUnCLIPImg2ImgPipeline(image_embeds=...)` with an empty prompt; sd (SEED v1):
`StableDiffusionPipeline(prompt_embeds=...)` with the text encoder's embedding of "" as the negative.
The pipeline comes from `pretrained_dir` (local files only) or, for tiny twins, is assembled from the same
seeded component builders the training target uses, so a twin's pipeline and target encoder agree.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableUnCLIPImg2ImgPipeline
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from PIL import Image
from transformers import CLIPImageProcessor

from src.models.seed_decoder import (
    KEY,
    SeedDecoderConfig,
    build_image_encoder,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from src.pipelines.detok import sampler_class

# The released pipelines' own defaults (SEED-LLaMA decodes unCLIP at 10, SD v1 samples at 7.5).
DEFAULT_GUIDANCE = {"unclip": 10.0, "sd": 7.5}


def build_scheduler(config: dict, key: str):
    """A diffusers scheduler from a scheduler_config.json-like dict; `_class_name` names the class."""
    cls = sampler_class(str(config.get("_class_name")), f"{key}._class_name")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _from_pretrained(cfg: SeedDecoderConfig, dtype: torch.dtype):
    if cfg.kind == "unclip":
        return StableUnCLIPImg2ImgPipeline.from_pretrained(cfg.pretrained_dir, local_files_only=True, dtype=dtype)
    return StableDiffusionPipeline.from_pretrained(cfg.pretrained_dir, local_files_only=True, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False)


def _from_config(cfg: SeedDecoderConfig, seed: int):
    """Random-init pipeline (tiny twins): every component from config under its fixed seed."""
    parts = {
        "vae": build_vae(cfg, False, seed),
        "text_encoder": build_text_encoder(cfg, False, seed),
        "tokenizer": build_tokenizer(cfg),
        "unet": build_unet(cfg, False, seed),
        "scheduler": build_scheduler(cfg.scheduler, f"{KEY}.scheduler"),
    }
    if cfg.kind == "sd":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    size = cfg.encoder_image_size
    return StableUnCLIPImg2ImgPipeline(
        **parts,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        image_encoder=build_image_encoder(cfg, False, seed),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=cfg.embed_dim),
        image_noising_scheduler=build_scheduler(
            {"_class_name": "DDPMScheduler", **cfg.image_noising_scheduler}, f"{KEY}.image_noising_scheduler"),
    )


def build_decode_pipeline(cfg: SeedDecoderConfig, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0):
    """The decoding pipeline: from `pretrained_dir` (checked, never downloaded) or random-init from config."""
    if cfg.loads_weights(True):
        pipe = _from_pretrained(cfg, dtype).to(device)
    else:
        pipe = _from_config(cfg, seed).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def empty_prompt_embeds(pipe, batch: int) -> torch.Tensor:
    """The text encoder's states of "" padded to the tokenizer length: SD v1's unconditional branch."""
    tok = pipe.tokenizer
    ids = tok([""] * batch, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(input_ids=ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def decode_embeddings(pipe, kind: str, embeds: torch.Tensor, *, steps: int = 20, guidance_scale: float | None = None,
                      seed: int = 0, noise_level: int = 0, resolution: int | None = None) -> list[Image.Image]:
    """Images for a batch of SEED decoder outputs: unclip (B, D) or (B, 1, D); sd (B, 77, D).

    Defaults as the released SEED-LLaMA decode (`seed_llama_tokenizer.py`): 20 steps, unCLIP guidance 10,
    noise_level 0. Deterministic for a seed (a CPU torch.Generator draws the latents and the unCLIP noise augmentation).
    `resolution` defaults to the UNet sample_size x VAE factor, i.e. the config's resolution.
    """
    if kind not in DEFAULT_GUIDANCE:
        raise ValueError(f"{KEY}.kind={kind!r} must be one of {sorted(DEFAULT_GUIDANCE)}")
    scale = DEFAULT_GUIDANCE[kind] if guidance_scale is None else guidance_scale
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    dtype = next(pipe.unet.parameters()).dtype
    kw = {"num_inference_steps": steps, "guidance_scale": scale, "height": size, "width": size,
          "output_type": "pil", "generator": torch.Generator("cpu").manual_seed(seed)}
    if kind == "unclip":
        if embeds.dim() == 3:
            embeds = embeds.squeeze(1)
        embeds = embeds.to(pipe.device, dtype)
        return pipe(image_embeds=embeds, prompt=[""] * embeds.shape[0], noise_level=noise_level, **kw).images
    embeds = embeds.to(pipe.device, dtype)
    negative = empty_prompt_embeds(pipe, embeds.shape[0]).to(dtype)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **kw).images
