"""Decode images from ViT features with the de-tokenizer (stage 1) or features + condition (stage 2).

Classifier-free guidance puts `negative` in place of the features in the unconditional branch: the
same tensor stage training drops features to (`stage.negative`: the official de-tokenizers' ViT
features of an all-zero image, or zeros). With a condition latent it is InstructPix2Pix's 3-branch form:
    eps = eps(n, 0) + s_img * (eps(n, c) - eps(n, 0)) + s_feat * (eps(f, c) - eps(n, c)).
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler


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
) -> torch.Tensor:
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
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

    for t in scheduler.timesteps:
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
