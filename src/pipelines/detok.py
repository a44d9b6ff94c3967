"""Decode images from ViT features with the de-tokenizer (stage 1) or features + condition (stage 2).

Classifier-free guidance puts `negative` in place of the features in the unconditional branch: the
same tensor stage training drops features to (`stage.negative`: the official de-tokenizers' ViT
features of an all-zero image, or zeros). With a condition latent it is InstructPix2Pix's 3-branch form:
    eps = eps(n, 0) + s_img * (eps(n, c) - eps(n, 0)) + s_feat * (eps(f, c) - eps(n, c)).
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from PIL import Image
from torch import nn

from src.data.images import vae_view
from src.models.detokenizer import encode_posterior

DEFAULT_SAMPLER = "EulerDiscreteScheduler"


def sampler_class(name: str, key: str = "sampler"):
    """A diffusers scheduler class by name (EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler...)."""
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{key}={name!r} is not a diffusers scheduler class (e.g. {DEFAULT_SAMPLER}, "  # noqa: TRY004 - a config value, not a type error
                         "DPMSolverMultistepScheduler, DDIMScheduler)")
    return cls


@torch.no_grad()
def denoise(
    resampler,
    unet,
    scheduler_config,
    feats: torch.Tensor,
    time_ids: torch.Tensor,
    latent_shape: tuple[int, int, int],
    *,
    negative: torch.Tensor,
    steps: int = 25,
    guidance_scale: float = 7.5,
    cond_latents: torch.Tensor | None = None,
    image_guidance_scale: float = 1.5,
    generator: torch.Generator | None = None,
    sampler: str = DEFAULT_SAMPLER,
    progress=None,
) -> torch.Tensor:
    scheduler = sampler_class(sampler).from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=feats.device)
    b = feats.shape[0]
    dtype = next(unet.parameters()).dtype
    latents = torch.randn((b, *latent_shape), generator=generator).to(feats.device, dtype)
    latents = latents * scheduler.init_noise_sigma

    neg = negative.to(feats).expand_as(feats)  # (1, T, D) or (B, T, D)
    if cond_latents is None:
        branch_feats = [feats, neg]
        branch_cond = None
    else:
        branch_feats = [feats, neg, neg]
        branch_cond = torch.cat([cond_latents, cond_latents, torch.zeros_like(cond_latents)])
    prompt, pooled = resampler(torch.cat(branch_feats).to(dtype))
    ids = time_ids.repeat(len(branch_feats), 1).to(feats.device, dtype)

    for t in scheduler.timesteps if progress is None else progress(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * len(branch_feats)), t)
        if branch_cond is not None:
            x = torch.cat([x, branch_cond.to(x)], dim=1)
        eps = unet(x, t, encoder_hidden_states=prompt, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        if branch_cond is None:
            full, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (full - uncond)
        else:
            full, image_only, uncond = eps.chunk(3)
            eps = uncond + image_guidance_scale * (image_only - uncond) + guidance_scale * (full - image_only)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], in the decoder's dtype (fp32, or bf16 with stage.frozen_dtype)."""
    dtype = vae.decoder.conv_in.weight.dtype
    images = vae.decode((latents.float() / vae.config.scaling_factor).to(dtype)).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


@dataclass
class SamplingOptions:
    """How the de-tokenizer samples: diffusers scheduler class, steps, guidance scales, output size."""

    sampler: str = DEFAULT_SAMPLER
    steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5  # stage 2 only: weight of the condition image branch
    resolution: int | None = None  # None: the de-tokenizer's training resolution

    def __post_init__(self) -> None:
        sampler_class(self.sampler, "generate.sampling.sampler")
        if self.steps < 1:
            raise ValueError(f"generate.sampling.steps must be >= 1, got {self.steps}")


class ImageDecoder:
    """ViT-space features (n, 64, D) -> images, through a trained de-tokenizer (plain modules, no stage).

    `negative` is the unconditional branch the de-tokenizer was trained with (`stage.negative`: the ViT
    features of an all-zero image for official weights). With `conditional` (stage 2, conv_in takes
    4 + 4 channels) `decode` needs a condition image: its VAE latent (mode, unscaled: the convention the
    stage-2 de-tokenizers train with) is concatenated and sampling uses 3-branch guidance.
    """

    def __init__(self, resampler: nn.Module, unet: nn.Module, vae: nn.Module, scheduler_config,
                 negative: torch.Tensor, resolution: int) -> None:
        self.resampler, self.unet, self.vae = resampler, unet, vae
        self.scheduler_config = scheduler_config
        self.negative = negative
        self.resolution = int(resolution)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.conditional = unet.config.in_channels > vae.config.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def prompt_embeds(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapter's SDXL conditioning of `features` and of the negative, named as diffusers' SDXL pipelines
        take them (`pipe(**decoder.prompt_embeds(f), ...)` with an exported detokenizer/ draws what `decode` draws).
        """
        dtype = next(self.resampler.parameters()).dtype
        prompt, pooled = self.resampler(features.to(self.device, dtype))
        neg, neg_pooled = self.resampler(self.negative.to(self.device, dtype))
        n = features.shape[0]
        return {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg.expand(n, -1, -1), "negative_pooled_prompt_embeds": neg_pooled.expand(n, -1)}

    @torch.no_grad()
    def condition_latents(self, images: list[Image.Image], resolution: int) -> torch.Tensor:
        # stretched to the square, not cropped: the official edit script's `image.resize((1024, 1024))` (and
        # how seedx_detok_cond trains, data.image_fit: stretch)
        pixels = torch.stack([vae_view(im, resolution, "stretch")[0] for im in images]).to(self.device)
        return encode_posterior(self.vae, pixels).mode()

    @torch.no_grad()
    def decode(self, features: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None,
               conditions: list[Image.Image] | None = None, progress=None) -> list[Image.Image]:
        res = options.resolution or self.resolution
        if res % self.vae_scale:
            raise ValueError(f"generate.sampling.resolution={res} must be divisible by {self.vae_scale}")
        if self.conditional and conditions is None:
            raise ValueError("this de-tokenizer is conditional (stage 2): it needs a condition image")
        n = features.shape[0]
        cond = self.condition_latents(conditions, res) if self.conditional else None
        # SDXL micro-conditioning: original size = crop size = target size, no crop.
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(n, 1)
        latents = denoise(
            self.resampler, self.unet, self.scheduler_config, features.to(self.device), time_ids,
            latent_shape=(self.unet.config.out_channels, res // self.vae_scale, res // self.vae_scale),
            negative=self.negative, steps=options.steps, guidance_scale=options.guidance_scale,
            cond_latents=cond, image_guidance_scale=options.image_guidance_scale, generator=generator,
            sampler=options.sampler, progress=progress,
        )
        return to_pil(decode_latents(self.vae, latents))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(n, 3, H, W) in [0, 1] -> 8-bit RGB images."""
    arr = (images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
