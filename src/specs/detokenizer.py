"""The de-tokenizer's spec: frozen ViT and VAE, the perceiver adapter (`resampler`) and the SDXL UNet.

Stage 1 (`DetokRecipe`) trains the adapter and the UNet's to_k/to_v; stage 2 (`DetokCondRecipe`) widens
`conv_in` 4 -> 8 for the condition image's latent and trains the whole UNet, starting from a stage-1
adapter checkpoint. Attribute names (`resampler`, `unet`) equal the official SDXLAdapter's, so official
checkpoints load into the state dict as they are. `DetokModel` / `DetokCondModel` are the plain models
inference builds (`image_decoder()`); src/stages/detok_pretrain.py and detok_cond.py add the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from src.models.detok_adapter import ResamplerXLV2
from src.models.detokenizer import (
    DetokenizerConfig,
    adapter_checkpoint_sources,
    build_noise_scheduler,
    build_unet,
    build_vae,
    diffusers_weight_sources,
    hold_decoder_in,
    is_attention_kv,
    widen_conv_in,
)
from src.models.qwen_vit import QwenViT, QwenViTConfig, build_vit, vit_weight_sources
from src.pipelines.detok import ImageDecoder
from src.specs.base import ModelSpec, Recipe, SpecModel
from src.utils.constraints import ConfigValueError
from src.utils.materialize import (
    TensorSource,
    ZeroPaddedColumns,
    clean_name,
    empty_init,
    held,
    materialize,
    prefixed,
)
from src.utils.weights import RequiredPath, check_keys_and_shapes


@dataclass
class DetokConfig:
    """The typed model config of a de-tokenizer stage: `model.{vit,detokenizer}` and the stage's model arguments."""

    vit: QwenViTConfig
    detokenizer: DetokenizerConfig
    init_seed: int = 0
    negative: Literal["official", "zeros"] = "official"
    frozen_dtype: Literal["bf16"] | None = None

    @classmethod
    def from_args(cls, model: dict, init_seed: int = 0, negative: str = "official",
                  frozen_dtype: str | None = None) -> DetokConfig:
        """Parse and cross-check: a mistake fails before any model is built."""
        cfg = cls(QwenViTConfig(**model["vit"]), DetokenizerConfig(**model["detokenizer"]), init_seed, negative,
                  frozen_dtype)
        if cfg.detokenizer.adapter_cfg.embedding_dim != cfg.vit.output_dim:
            raise ConfigValueError(
                "model.detokenizer.adapter.embedding_dim",
                f"model.detokenizer.adapter.embedding_dim={cfg.detokenizer.adapter_cfg.embedding_dim} must "
                f"equal model.vit.output_dim={cfg.vit.output_dim}"
            )
        return cfg


class DetokRecipe(Recipe):
    stage_name = "stage1"
    builds_empty = True

    def configure(self, cfg: DetokConfig) -> None:
        self.vit_cfg, self.detok_cfg = cfg.vit, cfg.detokenizer
        self.init_seed = cfg.init_seed
        self.negative = cfg.negative
        self.frozen_dtype = cfg.frozen_dtype
        self._negative: torch.Tensor | None = None  # cached; not a buffer, so never in a checkpoint

    def build_empty(self, load_weights: bool = True) -> None:
        """ViT, adapter, UNet and VAE with parameters on meta (UNet and VAE shaped by the SDXL folder's configs
        when weights load), trainability and frozen dtypes set; reads no weights (`weight_sources` has them)."""
        if load_weights:
            self.detok_cfg.check_weights_present()
        with empty_init():
            self.vit = QwenViT(self.vit_cfg)
            self.resampler = ResamplerXLV2(self.detok_cfg.adapter_cfg)
            self.unet = build_unet(self.detok_cfg, load_weights)
            self.vae = build_vae(self.detok_cfg, load_weights)
        self.noise_scheduler = build_noise_scheduler(self.detok_cfg)
        self.adapt_unet()
        self.set_trainable()
        if self.frozen_dtype == "bf16":
            # Frozen weights at half the bytes: the ViT whole, the VAE only where it decodes.
            self.vit.to(torch.bfloat16)
            hold_decoder_in(self.vae, torch.bfloat16)

    def weight_sources(self, load_weights: bool = True) -> dict[str, TensorSource]:
        """Every parameter's initial value: `model.vit.weights` and the SDXL folder's UNet and VAE (read shard by
        shard), the adapter checkpoint (`model.detokenizer.adapter_weights`) over them, and the random-init parts
        (the adapter; UNet and VAE of tiny twins) drawn as one stream under `stage.init_seed`, the adapter first:
        the same on every rank and after a resume."""
        cfg = self.detok_cfg
        vit_cfg = self.vit_cfg if load_weights else replace(self.vit_cfg, weights=None)
        sources = prefixed(vit_weight_sources(vit_cfg, cfg.allow_random_init or not load_weights, self.init_seed),
                           "vit.")
        from_folder = load_weights and bool(cfg.pretrained_dir)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(self.init_seed)
            towers = {"resampler": ResamplerXLV2(cfg.adapter_cfg)}
            if not from_folder:
                towers.update(unet=build_unet(cfg, False), vae=build_vae(cfg, False))
        for name, tower in towers.items():
            sources.update(held({k: p.detach() for k, p in tower.named_parameters()}, f"{name}."))
        if from_folder:
            for name in ("unet", "vae"):
                sources.update(prefixed(diffusers_weight_sources(getattr(self, name), cfg.pretrained_dir, name),
                                        f"{name}."))
        adapter = adapter_checkpoint_sources(cfg.adapter_weights) if load_weights and cfg.adapter_weights else {}
        sources = self.adapt_sources({**sources, **adapter})  # the checkpoint's tensors over the folder's
        if adapter:
            self.check_adapter_keys({k: sources[k] for k in adapter}, cfg.adapter_weights)
        return sources

    def required_paths(self) -> list[RequiredPath]:
        # Stage 2 (require_stage1) also starts from the stage-1 adapter checkpoint.
        need_adapter = bool(getattr(self, "require_stage1", False))
        return self.vit_cfg.required_paths(self.detok_cfg.allow_random_init) + self.detok_cfg.required_paths(need_adapter)

    def build_frozen_encoders(self) -> dict[str, torch.nn.Module]:
        """ViT and VAE exactly as `build_models(load_weights=True)` makes them (data_prep/precompute_features.py).

        With SDXL weights the VAE needs nothing else; a random-init VAE (tiny twins) is drawn under
        `init_seed` after the adapter and UNet, so then everything is built to replay those draws.
        """
        cfg = self.detok_cfg
        if not cfg.pretrained_dir:
            self.build_models(load_weights=True)
            return {"vit": self.vit, "vae": self.vae}
        cfg.check_weights_present()
        with empty_init():
            vae = build_vae(cfg, load_weights=True)
        materialize(vae, diffusers_weight_sources(vae, cfg.pretrained_dir, "vae"), "cpu", "the SDXL VAE")
        vit = build_vit(self.vit_cfg, cfg.allow_random_init, self.init_seed)
        return {"vit": vit, "vae": vae.requires_grad_(False).eval()}

    def adapt_unet(self) -> None:
        """Hook for stage 2 (conv_in widening); stage 1 uses the UNet as built."""

    def adapt_sources(self, sources: dict[str, TensorSource]) -> dict[str, TensorSource]:
        """Hook for stage 2 (a stage-1 or SDXL conv_in is narrower than the widened one)."""
        return sources

    def check_adapter_keys(self, sources: dict[str, TensorSource], path: str) -> None:
        """An official or our de-tokenizer checkpoint (`sources`, as adapted): every adapter (`resampler.*`) key
        must be in it, and every key in it must be ours (`unet.*` ones replace the SDXL weights); a mismatch
        names the keys."""
        own = {clean_name(n): tuple(p.shape) for n, p in self.named_parameters()}
        given = {k: tuple(v.shape) for k, v in sources.items()}
        expected = {k: shape for k, shape in own.items() if k.startswith("resampler.") or k in given}
        check_keys_and_shapes(expected, given,
                              f"model.detokenizer.adapter_weights ({path}) does not match the de-tokenizer:", "checkpoint")

    def set_trainable(self) -> None:
        self.freeze_towers()
        self.resampler.requires_grad_(True)
        for name, p in self.unet.named_parameters():
            p.requires_grad_(self.detok_cfg.stage1_unet_trainable == "all" or is_attention_kv(name))

    # ---- conditioning -------------------------------------------------------------------------------
    def _vit_dtype(self) -> torch.dtype:
        return next(self.vit.parameters()).dtype

    @torch.no_grad()
    def vit_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen ViT -> 256 tokens -> 1-D avg-pool to 64 (the MLLM's generation target)."""
        return self.vit.pool_for_generation(self.vit(pixels.to(self._vit_dtype())))

    def negative_features(self) -> torch.Tensor:
        """(1, 64, D): what dropped features become, and the unconditional branch of sampling."""
        if self._negative is None:
            self._negative = self._compute_negative()
        return self._negative

    @torch.no_grad()
    def _compute_negative(self) -> torch.Tensor:
        device = next(self.vit.parameters()).device
        if self.negative == "zeros":
            tokens = self.vit_cfg.n_queries // self.vit_cfg.gen_pool_kernel
            return torch.zeros(1, tokens, self.vit_cfg.output_dim, device=device, dtype=self._vit_dtype())
        # Official SDXLAdapter: the ViT of a zero image tensor (zeros after normalisation), pooled 256 -> 64.
        size = self.vit_cfg.image_size
        return self.vit_features(torch.zeros(1, 3, size, size, device=device))

    def image_decoder(self) -> ImageDecoder:
        """The plain sampling pipeline of the built de-tokenizer (its unconditional branch included)."""
        return ImageDecoder(self.resampler, self.unet, self.vae, self.noise_scheduler.config,
                            self.negative_features(), self.detok_cfg.resolution)


class DetokCondRecipe(DetokRecipe):
    """Stage 2: the condition image's latent concatenated to the noisy latent (InstructPix2Pix)."""

    stage_name = "stage2"
    require_stage1 = True

    def build_empty(self, load_weights: bool = True) -> None:
        # Checked before anything is built; `src.inspect` (load_weights=False) needs no weights at all.
        needs_stage1 = self.require_stage1 and not self.detok_cfg.allow_random_init
        if load_weights and needs_stage1 and not self.detok_cfg.adapter_weights:
            raise ValueError(
                "model.detokenizer.adapter_weights: stage 2 starts from a stage-1 checkpoint "
                "(seedx_detok_pretrain's last.ckpt or the official first_stage pytorch_model.bin); set it"
            )
        super().build_empty(load_weights)

    def adapt_unet(self) -> None:
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels == latent_channels:
            widen_conv_in(self.unet, latent_channels)

    def adapt_sources(self, sources: dict[str, TensorSource]) -> dict[str, TensorSource]:
        # A 4-channel conv_in (SDXL's, a stage-1 checkpoint's, a random tiny one): its weights in the first
        # channels of the widened one, the new channels zero (`widen_conv_in`).
        key, want = "unet.conv_in.weight", tuple(self.unet.conv_in.weight.shape)
        source = sources.get(key)
        if source is not None and len(source.shape) == 4 and source.shape[1] < want[1]:
            sources[key] = ZeroPaddedColumns(source, want)
        return sources

    def set_trainable(self) -> None:
        super().set_trainable()
        self.unet.requires_grad_(True)


class DetokModel(DetokRecipe, SpecModel):
    """A stage-1 de-tokenizer for inference (`vit`, `resampler`, `unet`, `vae`), state dict keys as the stage's."""

    def __init__(self, model: dict, init_seed: int = 0, negative: str = "official",
                 frozen_dtype: str | None = None) -> None:
        nn.Module.__init__(self)
        self.configure(DetokConfig.from_args(model, init_seed, negative, frozen_dtype))


class DetokCondModel(DetokCondRecipe, DetokModel):
    """A stage-2 de-tokenizer for inference; its checkpoint holds the trained adapter, so no stage-1 file is needed."""

    require_stage1 = False


def _stage_by_args(hparams: dict) -> str:
    """Legacy path (no `stage_name` in the checkpoint): stage 2's constructor takes the condition-image drop rate."""
    return "stage2" if "cond_drop_rate" in hparams else "stage1"


DETOKENIZER = ModelSpec(
    name="detokenizer",
    config_classes={"vit": QwenViTConfig, "detokenizer": DetokenizerConfig},
    stages={"stage1": DetokModel, "stage2": DetokCondModel},
    frozen=("vit", "vae"),
    fsdp_blocks=("src.models.qwen_vit.VisualAttentionBlock", "diffusers.models.attention.BasicTransformerBlock"),
    fsdp_forward_methods={"vae": ("encode", "decode")},
    fsdp_keep_dtype=("vae",),  # latents are encoded in fp32 under strategy.fsdp2.param_dtype=bfloat16 too
    stage_by_args=_stage_by_args,
)
DetokRecipe.spec = DETOKENIZER
