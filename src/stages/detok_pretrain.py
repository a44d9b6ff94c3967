"""De-tokenizer stage 1: ViT features -> perceiver adapter -> SDXL UNet conditioning (eps-MSE).

Trains the adapter (`resampler`) and to_k/to_v of every UNet attention; ViT and VAE are frozen.
Attribute names (`resampler`, `unet`) equal the official SDXLAdapter's, so official checkpoints
load into this module's state dict as they are.

Precomputed inputs (`data.features_dir`, data_prep/precompute_features.py) skip both frozen encoders:
`batch["vit_features"]` is the ViT output (B, 256, D), pooled here as the ViT path pools it, and
`batch["vae_moments"]` the VAE posterior (mean, logvar), sampled here as `encode_latents` samples it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from src.models.detok_adapter import ResamplerXLV2
from src.models.detokenizer import (
    DetokenizerConfig,
    build_noise_scheduler,
    build_unet,
    build_vae,
    is_attention_kv,
    load_adapter_checkpoint,
)
from src.models.qwen_vit import QwenViT, QwenViTConfig, load_vit_weights
from src.pipelines.detok import decode_latents, denoise
from src.stages.base import StageModule


class DetokPretrainModule(StageModule):
    frozen_towers = ("vit", "vae")
    fsdp_blocks = (
        "src.models.qwen_vit.VisualAttentionBlock",
        "diffusers.models.attention.BasicTransformerBlock",
    )
    fsdp_forward_methods: ClassVar[dict[str, tuple[str, ...]]] = {"vae": ("encode", "decode")}

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
    ) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.vit_cfg = QwenViTConfig(**model["vit"])
        self.detok_cfg = DetokenizerConfig(**model["detokenizer"])
        if self.detok_cfg.adapter_cfg.embedding_dim != self.vit_cfg.output_dim:
            raise ValueError(
                f"model.detokenizer.adapter.embedding_dim={self.detok_cfg.adapter_cfg.embedding_dim} must "
                f"equal model.vit.output_dim={self.vit_cfg.output_dim}"
            )
        self.feature_drop_rate = feature_drop_rate
        self.noise_offset = noise_offset
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.init_seed = init_seed

    # ---- models -----------------------------------------------------------------------------------------
    def build_models(self, load_weights: bool = True) -> None:
        if load_weights:
            self.detok_cfg.check_weights_present()
        # Random-init towers (tiny twins) must be the same on every rank and after a resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            self.vit = QwenViT(self.vit_cfg)
            self.resampler = ResamplerXLV2(self.detok_cfg.adapter_cfg)
            self.unet = build_unet(self.detok_cfg, load_weights)
            self.vae = build_vae(self.detok_cfg, load_weights)
        if load_weights:
            self._load_vit_weights(self.vit)
        self.noise_scheduler = build_noise_scheduler(self.detok_cfg)
        self.adapt_unet()
        if load_weights and self.detok_cfg.adapter_weights:
            self.load_adapter_weights(self.detok_cfg.adapter_weights)
        self.set_trainable()

    def _load_vit_weights(self, vit: QwenViT) -> None:
        load_vit_weights(vit, self.detok_cfg.allow_random_init)

    def build_frozen_encoders(self) -> dict[str, torch.nn.Module]:
        """ViT and VAE exactly as `build_models(load_weights=True)` makes them (data_prep/precompute_features.py).

        With SDXL weights the VAE needs nothing else; a random-init VAE (tiny twins) is drawn under
        `init_seed` after the ViT, adapter and UNet, so then everything is built to replay those draws.
        """
        if not self.detok_cfg.pretrained_dir:
            self.build_models(load_weights=True)
            return {"vit": self.vit, "vae": self.vae}
        self.detok_cfg.check_weights_present()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            vit = QwenViT(self.vit_cfg)  # first draw of build_models' seeded block
        self._load_vit_weights(vit)
        vae = build_vae(self.detok_cfg, load_weights=True)
        return {"vit": vit.requires_grad_(False).eval(), "vae": vae.requires_grad_(False).eval()}

    def adapt_unet(self) -> None:
        """Hook for stage 2 (conv_in widening); stage 1 uses the UNet as built."""

    def load_adapter_weights(self, path: str) -> None:
        state = self.prepare_adapter_state(load_adapter_checkpoint(path))
        result = self.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"model.detokenizer.adapter_weights: unexpected keys {result.unexpected_keys[:8]}")

    def prepare_adapter_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for stage 2 (a stage-1 checkpoint has a narrower conv_in)."""
        return state

    def set_trainable(self) -> None:
        self.freeze_towers()
        self.resampler.requires_grad_(True)
        for name, p in self.unet.named_parameters():
            p.requires_grad_(is_attention_kv(name))

    # ---- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def vit_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen ViT -> 256 tokens -> 1-D avg-pool to 64 (the MLLM's generation target)."""
        return self.vit.pool_for_generation(self.vit(pixels.to(self._vit_dtype())))

    def _vit_dtype(self) -> torch.dtype:
        return next(self.vit.parameters()).dtype

    def batch_features(self, batch: dict) -> torch.Tensor:
        # Precomputed features (data_prep) skip the frozen ViT entirely.
        if "vit_features" in batch:
            return self.vit.pool_for_generation(batch["vit_features"].to(self._vit_dtype()))
        return self.vit_features(batch["vit_pixels"])

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Scaled VAE latents of the target: sampled from a precomputed posterior, or encoded now."""
        if "vae_moments" in batch:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            latents = DiagonalGaussianDistribution(batch["vae_moments"].float()).sample()
            return latents * self.vae.config.scaling_factor
        return self.encode_latents(batch["vae_pixels"])

    def batch_originals(self, batch: dict) -> torch.Tensor:
        """Targets in [0, 1] for sample grids; from precomputed latents, their VAE reconstruction (posterior mean)."""
        if "vae_pixels" in batch:
            return (batch["vae_pixels"].float().cpu() + 1) / 2
        mean = batch["vae_moments"].float().chunk(2, dim=1)[0]
        return decode_latents(self.vae, mean * self.vae.config.scaling_factor).cpu()

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.float()).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def time_ids(self, batch: dict) -> torch.Tensor:
        res = self.detok_cfg.resolution
        target = torch.tensor([res, res], device=self.device).expand(len(batch["original_size"]), 2)
        return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float()

    def unet_extra_input(self, batch: dict, latents: torch.Tensor, split: str) -> torch.Tensor | None:
        """Channels concatenated to the noisy latents (stage 2); stage 1 has none."""
        return None

    def drop_features(self, feats: torch.Tensor, split: str) -> torch.Tensor:
        if split != "train" or self.feature_drop_rate <= 0:
            return feats
        keep = torch.rand(feats.shape[0], 1, 1, device=feats.device) >= self.feature_drop_rate
        return feats * keep

    # ---- loss --------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        feats = self.drop_features(self.batch_features(batch), split)
        prompt_embeds, pooled = self.resampler(feats)
        latents = self.batch_latents(batch)
        generator = None
        if split != "train":
            # Validation loss uses fixed noise and timesteps so values are comparable across steps.
            generator = torch.Generator(device="cpu").manual_seed(1234)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.noise_offset and split == "train":
            noise = noise + self.noise_offset * torch.randn(latents.shape[:2] + (1, 1)).to(latents)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        extra = self.unet_extra_input(batch, latents, split)
        if extra is not None:
            noisy = torch.cat([noisy, extra.to(noisy)], dim=1)
        pred = self.unet(
            noisy,
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids(batch)},
        ).sample
        target = self.prediction_target(latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss}

    def prediction_target(self, latents, noise, t) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"model.detokenizer.scheduler.prediction_type={kind!r} is not supported")

    # ---- sampling (used by the sampling callback and pipelines) ------------------------------------------
    @torch.no_grad()
    def generate_latents(self, batch: dict, generator=None, cond_latents=None) -> torch.Tensor:
        return denoise(
            self.resampler,
            self.unet,
            self.noise_scheduler.config,
            self.batch_features(batch),
            self.time_ids(batch),
            latent_shape=(self.unet.config.out_channels, self.detok_cfg.latent_size, self.detok_cfg.latent_size),
            steps=self.sample_steps,
            guidance_scale=self.guidance_scale,
            cond_latents=cond_latents,
            image_guidance_scale=getattr(self, "image_guidance_scale", 1.0),
            generator=generator,
        )

    @torch.no_grad()
    def sample_images(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct the batch's images from their ViT features: {'original', 'reconstruction'} in [0, 1]."""
        latents = self.generate_latents(batch, generator)
        return {
            "original": self.batch_originals(batch),
            "reconstruction": decode_latents(self.vae, latents).cpu(),
        }
