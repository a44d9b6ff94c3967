"""De-tokenizer stage 1: ViT features -> perceiver adapter -> SDXL UNet conditioning (eps-MSE).

Trains the adapter (`resampler`) and to_k/to_v of every UNet attention; ViT and VAE are frozen.
Attribute names (`resampler`, `unet`) equal the official SDXLAdapter's, so official checkpoints
load into this module's state dict as they are.

Precomputed inputs (`data.features_dir`, data_prep/precompute_features.py) skip both frozen encoders:
`batch.vit_features` is the ViT output (B, 256, D), pooled here as the ViT path pools it, and
`batch.vae_moments` the VAE posterior (mean, logvar), sampled here as a live encode is sampled
(`src.data.batch.FrozenInputs` decides between stored and live).
The VAE always encodes in fp32, outside bf16 autocast; latents, noise and the eps target stay fp32.

Randomness of a training step (drop draws, latent sample, noise, noise offset, timesteps) comes from a
generator seeded from (stage.noise_seed, global rank, step, micro-batch): ranks draw different noise,
and a resume continues every rank's stream without saved RNG state (the seed travels in the checkpoint
and wins over the config's, so `seed=` on a resumed run does not switch streams). Validation draws from
one fixed generator so its loss is comparable across steps.

Dropped features (classifier-free guidance) become `stage.negative`: `official` = the frozen ViT's
pooled features of an all-zero image (what the released de-tokenizers were trained and sample with),
or `zeros`. The same tensor is the unconditional branch of sampling.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

from src.data.batch import DetokBatch, FrozenInputs
from src.models.detokenizer import encode_posterior
from src.pipelines.detok import decode_latents, denoise
from src.specs.detokenizer import DetokConfig, DetokRecipe
from src.stages.base import StageConfig, StageModule
from src.utils.constraints import Fraction, PositiveInt

log = logging.getLogger(__name__)

NOISE_SEED_KEY = "detok_noise_seed"  # top-level checkpoint entry


class DetokPretrainConfig(StageConfig):
    feature_drop_rate: Fraction = 0.0
    noise_offset: float = 0.0
    sample_steps: PositiveInt = 25
    guidance_scale: float = 7.5
    init_seed: int = 0
    noise_seed: int = 0
    negative: Literal["official", "zeros"] = "official"
    frozen_dtype: Literal["bf16"] | None = None


class DetokPretrainModule(DetokRecipe, StageModule):
    """The losses, sampling probes and step of de-tokenizer stage 1; its models are the spec's
    (src/specs/detokenizer.py)."""

    config_model = DetokPretrainConfig

    def __init__(
        self,
        model: dict,
        optimizer,
        scheduler: dict | None = None,
        checkpoint_frozen: bool = False,
        nonfinite_loss: str = "skip",
        feature_drop_rate: float = 0.0,
        noise_offset: float = 0.0,
        sample_steps: int = 25,
        guidance_scale: float = 7.5,
        init_seed: int = 0,
        noise_seed: int = 0,
        negative: Literal["official", "zeros"] = "official",
        frozen_dtype: Literal["bf16"] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.configure(DetokConfig.from_args(model, init_seed, negative, frozen_dtype))
        self.feature_drop_rate = feature_drop_rate
        self.noise_offset = noise_offset
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.noise_seed = int(noise_seed)

    def configure_model(self) -> None:
        if not self._built and self.frozen_dtype and self._trainer is not None:
            self._check_frozen_dtype()  # before anything is built
        super().configure_model()

    def _check_frozen_dtype(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        from src.parallel import FSDP2Strategy

        precision = str(self.trainer.precision)
        if not precision.startswith("bf16"):
            raise ValueError(f"stage.frozen_dtype={self.frozen_dtype} needs bf16 training (trainer.precision="
                             f"bf16-mixed), got trainer.precision={precision}")
        sharded = isinstance(self.trainer.strategy, (FSDP2Strategy, FSDPStrategy))
        if sharded:
            raise ValueError("stage.frozen_dtype is for DDP: FSDP shards the frozen towers and computes them in "
                             "its param_dtype (strategy.fsdp2.param_dtype); set stage.frozen_dtype=null")

    # ---- conditioning -------------------------------------------------------------------------------
    def frozen_inputs(self) -> FrozenInputs:
        """Stored features (data.features_dir) or the frozen towers on the batch's pixels."""
        return FrozenInputs(self._vit_on_pixels, lambda px: encode_posterior(self.vae, px), dtype=self._vit_dtype)

    @torch.no_grad()
    def _vit_on_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(pixels.to(self._vit_dtype()))

    def batch_features(self, batch: DetokBatch) -> torch.Tensor:
        """The target's ViT tokens pooled to the MLLM's generation target, from stored features or pixels."""
        return self.vit.pool_for_generation(self.frozen_inputs().vit(batch))

    def batch_latents(self, batch: DetokBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled fp32 VAE latents of the target, sampled from a precomputed posterior or one encoded now
        (the same draw from `generator` either way)."""
        posterior = self.frozen_inputs().posterior(batch)
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def batch_originals(self, batch: DetokBatch) -> torch.Tensor:
        """Targets in [0, 1] for sample grids; from precomputed latents, their VAE reconstruction (posterior mean)."""
        if not batch.stored_features:
            return (batch.vae_pixels.float().cpu() + 1) / 2
        mean = batch.vae_moments.float().chunk(2, dim=1)[0]
        return decode_latents(self.vae, mean * self.vae.config.scaling_factor).cpu()

    def time_ids(self, batch: DetokBatch) -> torch.Tensor:
        res = self.detok_cfg.resolution
        target = torch.tensor([res, res], device=self.device).expand(len(batch.original_size), 2)
        return torch.cat([batch.original_size, batch.crop_top_left, target], dim=1).float()

    def unet_extra_input(self, batch: DetokBatch, drops: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """Channels concatenated to the noisy latents (stage 2); stage 1 has none."""
        return None

    # ---- randomness and classifier-free-guidance dropout ----------------------------------------------
    def drop_masks(self, u: torch.Tensor, batch: DetokBatch) -> dict[str, torch.Tensor]:
        """Which samples lose which condition, from one uniform draw `u` per sample."""
        return {"features": u < self.feature_drop_rate}

    def drop_rates(self, drops: dict[str, torch.Tensor], batch: DetokBatch) -> dict[str, torch.Tensor]:
        """Realised fractions of the batch, logged as train/drop_*."""
        return {"drop_features": drops["features"].float().mean()}

    def on_fit_start(self) -> None:
        # A sharded ViT all-gathers in forward: every rank computes the negative here, at the same point.
        self._negative = None
        self.negative_features()

    def on_validation_start(self) -> None:
        self.negative_features()  # trainer.validate without fit: same reason as on_fit_start

    def apply_negative(self, feats: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if not bool(drop.any()):
            return feats
        neg = self.negative_features().to(feats)
        return torch.where(drop.to(feats.device).view(-1, 1, 1), neg, feats)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[NOISE_SEED_KEY] = int(self.noise_seed)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get(NOISE_SEED_KEY)
        if stored is not None and int(stored) != self.noise_seed:
            log.info("resume: noise stream of the checkpoint (stage.noise_seed=%d), not %d", stored, self.noise_seed)
            self.noise_seed = int(stored)
        super().on_load_checkpoint(checkpoint)

    # ---- loss --------------------------------------------------------------------------------------
    def compute_losses(self, batch: DetokBatch, split: str) -> dict[str, torch.Tensor]:
        # CPU draws, then moved: the same stream on any device.
        generator = self.step_generator(split)
        feats = self.batch_features(batch)
        drops = None
        if split == "train":  # drawn even at zero rates, so changing a rate does not shift the noise
            drops = self.drop_masks(torch.rand(feats.shape[0], generator=generator), batch)
            feats = self.apply_negative(feats, drops["features"])
        prompt_embeds, pooled = self.resampler(feats)
        latents = self.batch_latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.noise_offset and split == "train":
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator)
            noise = noise + self.noise_offset * offset.to(latents)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        extra = self.unet_extra_input(batch, drops)
        if extra is not None:
            noisy = torch.cat([noisy, extra.to(noisy)], dim=1)
        pred = self.unet(
            noisy,
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids(batch)},
        ).sample
        target = self.prediction_target(latents, noise, t)  # fp32, as latents and noise
        losses = {"loss": F.mse_loss(pred.float(), target.float())}
        if drops is not None:
            losses.update({k: v.detach() for k, v in self.drop_rates(drops, batch).items()})
        return losses

    def prediction_target(self, latents, noise, t) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"model.detokenizer.scheduler.prediction_type={kind!r} is not supported")

    # ---- sampling (used by the sampling callback and pipelines) ------------------------------------------
    @torch.no_grad()
    def generate_latents(self, batch: DetokBatch, generator=None, cond_latents=None) -> torch.Tensor:
        return denoise(
            self.resampler,
            self.unet,
            self.noise_scheduler.config,
            self.batch_features(batch),
            self.time_ids(batch),
            latent_shape=(self.unet.config.out_channels, self.detok_cfg.latent_size, self.detok_cfg.latent_size),
            negative=self.negative_features(),
            steps=self.sample_steps,
            guidance_scale=self.guidance_scale,
            cond_latents=cond_latents,
            image_guidance_scale=getattr(self, "image_guidance_scale", 1.0),
            generator=generator,
        )

    @torch.no_grad()
    def sample_images(self, batch: DetokBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct the batch's images from their ViT features: {'original', 'reconstruction'} in [0, 1]."""
        latents = self.generate_latents(batch, generator)
        return {
            "original": self.batch_originals(batch),
            "reconstruction": decode_latents(self.vae, latents).cpu(),
        }
