"""De-tokenizer stage 2: condition image latent concatenated to the noisy latent (InstructPix2Pix).

`conv_in` widens 4 -> 8 (new channels zero, so the stage-1 UNet is unchanged at start); the whole
UNet and the adapter train. The condition is the VAE latent of the source image (mode, unscaled, fp32
encode); caption/image-only records have no source and get zeros.

Classifier-free-guidance dropout follows InstructPix2Pix: one uniform draw u per sample and disjoint
intervals, features only [0, f), both [f, f+b), image only [f+b, f+b+c) with f, b, c =
`feature_drop_rate`, `both_drop_rate`, `cond_drop_rate`. Dropped features become `stage.negative`, a
dropped image zeros. The logged train/drop_{features,image,both} are fractions of the batch's samples
that have a condition image (omitted when none has); a caption sample draws the same way, but has no
image to lose, so its features drop at f + b.
"""

from __future__ import annotations

import torch
from pydantic import ValidationInfo, field_validator

from src.data.batch import DetokBatch
from src.pipelines.detok import decode_latents
from src.specs.detokenizer import DetokCondRecipe
from src.stages.detok_pretrain import DetokPretrainConfig, DetokPretrainModule
from src.utils.constraints import Fraction


class DetokCondConfig(DetokPretrainConfig):
    both_drop_rate: Fraction = 0.0
    cond_drop_rate: Fraction = 0.05
    image_guidance_scale: float = 1.5
    require_stage1: bool = True

    @field_validator("cond_drop_rate")
    @classmethod
    def _disjoint_intervals(cls, c: float, info: ValidationInfo) -> float:
        # three disjoint intervals of one uniform draw (reported under the stage-2 rate, validated last)
        f, b = info.data.get("feature_drop_rate"), info.data.get("both_drop_rate")
        if f is not None and b is not None and f + b + c > 1.0 + 1e-9:
            raise ValueError(f"stage.feature_drop_rate + stage.both_drop_rate + stage.cond_drop_rate must be <= 1, "
                             f"got {f} + {b} + {c} = {f + b + c}")
        return c


class DetokCondModule(DetokCondRecipe, DetokPretrainModule):
    """Stage 2's drop draws, condition input and sampling; its models are the spec's (src/specs/detokenizer.py)."""

    config_model = DetokCondConfig

    def __init__(
        self,
        *args,
        cond_drop_rate: float = 0.05,
        both_drop_rate: float = 0.0,
        image_guidance_scale: float = 1.5,
        require_stage1: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.require_stage1 = require_stage1
        self.cond_drop_rate = cond_drop_rate
        self.both_drop_rate = both_drop_rate
        self.image_guidance_scale = image_guidance_scale

    @torch.no_grad()
    def condition_latents(self, batch: DetokBatch) -> torch.Tensor:
        # Unscaled mode of the posterior: the InstructPix2Pix convention (DESIGN: mode, unscaled).
        cond = self.frozen_inputs().posterior(batch, cond=True).mode()  # stored or encoded now
        return cond * batch.has_cond.view(-1, 1, 1, 1).to(cond)

    def drop_masks(self, u: torch.Tensor, batch: DetokBatch) -> dict[str, torch.Tensor]:
        f, b, c = self.feature_drop_rate, self.both_drop_rate, self.cond_drop_rate
        return {"features": u < f + b, "image": (u >= f) & (u < f + b + c)}

    def drop_rates(self, drops: dict[str, torch.Tensor], batch: DetokBatch) -> dict[str, torch.Tensor]:
        has = batch.has_cond.bool().cpu()
        n = int(has.sum())
        if n == 0:
            return {}
        feat, img = drops["features"], drops["image"]
        return {
            "drop_features": (feat & ~img & has).sum() / n,
            "drop_image": (img & ~feat & has).sum() / n,
            "drop_both": (feat & img & has).sum() / n,
        }

    def unet_extra_input(self, batch: DetokBatch, drops: dict[str, torch.Tensor] | None) -> torch.Tensor:
        cond = self.condition_latents(batch)
        if drops is not None:
            cond = cond * (~drops["image"]).view(-1, 1, 1, 1).to(cond)
        return cond

    @torch.no_grad()
    def sample_images(self, batch: DetokBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{'condition', 'target', 'generated'} in [0, 1]; 3-branch CFG (features, condition image)."""
        cond = self.condition_latents(batch)
        latents = self.generate_latents(batch, generator, cond_latents=cond)
        if not batch.stored_features:
            condition = (batch.cond_pixels.float().cpu() + 1) / 2
        else:  # precomputed latents: the VAE reconstruction of the condition
            condition = decode_latents(self.vae, cond * self.vae.config.scaling_factor).cpu()
        return {
            "condition": condition,
            "target": self.batch_originals(batch),
            "generated": decode_latents(self.vae, latents).cpu(),
        }
