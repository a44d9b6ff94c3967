"""De-tokenizer stage 1: ViT features -> perceiver adapter -> SDXL UNet conditioning (eps-MSE).

Trains the adapter (`resampler`) and to_k/to_v of every UNet attention; ViT and VAE are frozen.
Attribute names (`resampler`, `unet`) equal the official SDXLAdapter's, so official checkpoints
load into this module's state dict as they are.

Precomputed inputs (`data.features_dir`, data_prep/precompute_features.py) skip both frozen encoders:
`batch["vit_features"]` is the ViT output (B, 256, D), pooled here as the ViT path pools it, and
`batch["vae_moments"]` the VAE posterior (mean, logvar), sampled here as a live encode is sampled.
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
from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from src.models.detok_adapter import ResamplerXLV2
from src.models.detokenizer import (
    DetokenizerConfig,
    build_noise_scheduler,
    build_unet,
    build_vae,
    encode_posterior,
    hold_decoder_in,
    is_attention_kv,
    load_adapter_checkpoint,
)
from src.models.qwen_vit import QwenViT, QwenViTConfig, build_vit
from src.pipelines.detok import decode_latents, denoise
from src.stages.base import StageConfig, StageModule
from src.utils.constraints import ConfigValueError, Fraction, PositiveInt
from src.utils.materialize import seeded
from src.utils.weights import RequiredPath, check_keys_and_shapes

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


class DetokPretrainModule(StageModule):

    config_model: ClassVar[type[StageConfig]] = DetokPretrainConfig
    checkpoint_family = "detokenizer"  # written into its checkpoints (src/utils/checkpoint_kind.py)
    frozen_towers = ("vit", "vae")
    fsdp_blocks = (
        "src.models.qwen_vit.VisualAttentionBlock",
        "diffusers.models.attention.BasicTransformerBlock",
    )
    fsdp_forward_methods: ClassVar[dict[str, tuple[str, ...]]] = {"vae": ("encode", "decode")}
    fsdp_keep_dtype = ("vae",)  # latents are encoded in fp32 under strategy.fsdp2.param_dtype=bfloat16 too

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
        self.vit_cfg = QwenViTConfig(**model["vit"])
        self.detok_cfg = DetokenizerConfig(**model["detokenizer"])
        if self.detok_cfg.adapter_cfg.embedding_dim != self.vit_cfg.output_dim:
            raise ConfigValueError("model.detokenizer.adapter.embedding_dim", 
                f"model.detokenizer.adapter.embedding_dim={self.detok_cfg.adapter_cfg.embedding_dim} must "
                f"equal model.vit.output_dim={self.vit_cfg.output_dim}"
            )
        self.feature_drop_rate = feature_drop_rate
        self.noise_offset = noise_offset
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.init_seed = init_seed
        self.noise_seed = int(noise_seed)
        self.negative = negative
        self.frozen_dtype = frozen_dtype
        self._negative: torch.Tensor | None = None  # cached; not a buffer, so never in a checkpoint

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

    # ---- models -----------------------------------------------------------------------------------------
    def build_models(self, load_weights: bool = True) -> None:
        if load_weights:
            self.detok_cfg.check_weights_present()
        self.vit = self._build_vit(load_weights)
        # Random-init towers (tiny twins) must be the same on every rank and after a resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            self.resampler = ResamplerXLV2(self.detok_cfg.adapter_cfg)
            self.unet = build_unet(self.detok_cfg, load_weights)
            self.vae = build_vae(self.detok_cfg, load_weights)
        self.noise_scheduler = build_noise_scheduler(self.detok_cfg)
        self.adapt_unet()
        if load_weights and self.detok_cfg.adapter_weights:
            self.load_adapter_weights(self.detok_cfg.adapter_weights)
        self.set_trainable()
        if self.frozen_dtype == "bf16":
            # Frozen weights at half the bytes: the ViT whole, the VAE only where it decodes.
            self.vit.to(torch.bfloat16)
            hold_decoder_in(self.vae, torch.bfloat16)

    def _build_vit(self, load_weights: bool) -> QwenViT:
        """`model.vit.weights`, or (tiny twins) the random init of the "vit" tower seed: the same ViT the
        MLLM stage builds from the same config and init seed, so its regression targets are the features
        this de-tokenizer decodes."""
        if not load_weights:  # inspect / meta-device builds: built where the caller builds, nothing read
            with seeded(self.init_seed, "vit"):
                return QwenViT(replace(self.vit_cfg, weights=None))
        return build_vit(self.vit_cfg, self.detok_cfg.allow_random_init, self.init_seed)

    def required_paths(self) -> list[RequiredPath]:
        # Stage 2 (require_stage1) also starts from the stage-1 adapter checkpoint.
        need_adapter = bool(getattr(self, "require_stage1", False))
        return self.vit_cfg.required_paths(self.detok_cfg.allow_random_init) + self.detok_cfg.required_paths(need_adapter)

    def build_frozen_encoders(self) -> dict[str, torch.nn.Module]:
        """ViT and VAE exactly as `build_models(load_weights=True)` makes them (data_prep/precompute_features.py).

        With SDXL weights the VAE needs nothing else; a random-init VAE (tiny twins) is drawn under
        `init_seed` after the adapter and UNet, so then everything is built to replay those draws.
        """
        if not self.detok_cfg.pretrained_dir:
            self.build_models(load_weights=True)
            return {"vit": self.vit, "vae": self.vae}
        self.detok_cfg.check_weights_present()
        vae = build_vae(self.detok_cfg, load_weights=True)
        return {"vit": self._build_vit(True), "vae": vae.requires_grad_(False).eval()}

    def adapt_unet(self) -> None:
        """Hook for stage 2 (conv_in widening); stage 1 uses the UNet as built."""

    def load_adapter_weights(self, path: str) -> None:
        """An official or our de-tokenizer checkpoint: every adapter (`resampler.*`) key must be in it, and
        every key in it must be ours (`unet.*` ones replace the SDXL weights); a mismatch names the keys."""
        state = self.prepare_adapter_state(load_adapter_checkpoint(path))
        own = self.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items() if k.startswith("resampler.") or k in state}
        check_keys_and_shapes(expected, {k: tuple(v.shape) for k, v in state.items()},
                              f"model.detokenizer.adapter_weights ({path}) does not match the de-tokenizer:", "checkpoint")
        self.load_state_dict(state, strict=False)

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

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled fp32 VAE latents of the target, sampled from a precomputed posterior or one encoded now
        (the same draw from `generator` either way)."""
        if "vae_moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["vae_moments"].float())
        else:
            with torch.no_grad():
                posterior = encode_posterior(self.vae, batch["vae_pixels"])
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def batch_originals(self, batch: dict) -> torch.Tensor:
        """Targets in [0, 1] for sample grids; from precomputed latents, their VAE reconstruction (posterior mean)."""
        if "vae_pixels" in batch:
            return (batch["vae_pixels"].float().cpu() + 1) / 2
        mean = batch["vae_moments"].float().chunk(2, dim=1)[0]
        return decode_latents(self.vae, mean * self.vae.config.scaling_factor).cpu()

    def time_ids(self, batch: dict) -> torch.Tensor:
        res = self.detok_cfg.resolution
        target = torch.tensor([res, res], device=self.device).expand(len(batch["original_size"]), 2)
        return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float()

    def unet_extra_input(self, batch: dict, drops: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """Channels concatenated to the noisy latents (stage 2); stage 1 has none."""
        return None

    # ---- randomness and classifier-free-guidance dropout ----------------------------------------------
    def drop_masks(self, u: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Which samples lose which condition, from one uniform draw `u` per sample."""
        return {"features": u < self.feature_drop_rate}

    def drop_rates(self, drops: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Realised fractions of the batch, logged as train/drop_*."""
        return {"drop_features": drops["features"].float().mean()}

    def negative_features(self) -> torch.Tensor:
        """(1, 64, D): what dropped features become, and the unconditional branch of sampling."""
        if self._negative is None:
            self._negative = self._compute_negative()
        return self._negative

    @torch.no_grad()
    def _compute_negative(self) -> torch.Tensor:
        if self.negative == "zeros":
            tokens = self.vit_cfg.n_queries // self.vit_cfg.gen_pool_kernel
            return torch.zeros(1, tokens, self.vit_cfg.output_dim, device=self.device, dtype=self._vit_dtype())
        # Official SDXLAdapter: the ViT of a zero image tensor (zeros after normalisation), pooled 256 -> 64.
        size = self.vit_cfg.image_size
        return self.vit_features(torch.zeros(1, 3, size, size, device=self.device))

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
    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
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
    def generate_latents(self, batch: dict, generator=None, cond_latents=None) -> torch.Tensor:
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
    def sample_images(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct the batch's images from their ViT features: {'original', 'reconstruction'} in [0, 1]."""
        latents = self.generate_latents(batch, generator)
        return {
            "original": self.batch_originals(batch),
            "reconstruction": decode_latents(self.vae, latents).cpu(),
        }
