"""SEED-X visual de-tokenizer: SDXL UNet + VAE (diffusers) conditioned by the perceiver adapter.

Architecture and weights are separate: every piece builds from its config dict (meta device works),
and `load_*` functions read local files only. The adapter (ResamplerXLV2) turns 64 ViT tokens into
SDXL `encoder_hidden_states` (64 x 2048) and the pooled `text_embeds` (1280).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from src.models.detok_adapter import DetokAdapterConfig
from src.utils.constraints import PositiveInt
from src.utils.materialize import HeldTensor, SafetensorsTensor, TensorSource, state_dict_file
from src.utils.weights import MissingWeightsError, RequiredPath, check_paths, missing_weights_error

# diffusers' file name of a component's weights (`diffusion_pytorch_model.safetensors`, `.bin`, sharded index)
WEIGHTS_STEM = "diffusion_pytorch_model"

# SDXL micro-conditioning: original (h, w) + crop top-left (y, x) + target (h, w).
NUM_TIME_IDS = 6


@dataclass
class DetokenizerConfig:
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    adapter: dict[str, Any] = field(default_factory=dict)
    resolution: PositiveInt = 1024
    pretrained_dir: str | None = None
    adapter_weights: str | None = None
    allow_random_init: bool = False
    # Recompute UNet activations in backward (diffusers' own checkpointing): less memory, ~30% slower.
    gradient_checkpointing: bool = False
    # What stage 1 trains in the UNet beside the adapter: `kv` = to_k/to_v (SEED-X's recipe, on SDXL's strong
    # prior); `all` = every UNet weight (tiny twins: a tiny UNet's to_k/to_v alone barely take up the features).
    stage1_unet_trainable: str = "kv"

    def __post_init__(self) -> None:
        if self.stage1_unet_trainable not in ("kv", "all"):
            raise ValueError(f"model.detokenizer.stage1_unet_trainable must be 'kv' or 'all', got "
                             f"{self.stage1_unet_trainable!r}")
        self.adapter_cfg = DetokAdapterConfig(**self.adapter)
        cross = self.unet.get("cross_attention_dim")
        if cross != self.adapter_cfg.prompt_dim:
            raise ValueError(
                f"model.detokenizer.unet.cross_attention_dim={cross} must equal adapter output1_dim + "
                f"output2_dim = {self.adapter_cfg.prompt_dim}"
            )
        want = NUM_TIME_IDS * self.unet["addition_time_embed_dim"] + self.adapter_cfg.output2_dim
        if self.unet.get("projection_class_embeddings_input_dim") != want:
            raise ValueError(
                "model.detokenizer.unet.projection_class_embeddings_input_dim must be 6 x "
                f"addition_time_embed_dim + adapter.output2_dim = {want}, got "
                f"{self.unet.get('projection_class_embeddings_input_dim')}"
            )
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"model.detokenizer.resolution={self.resolution} must be divisible by the VAE "
                f"downsampling factor {self.vae_scale_factor}"
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def required_paths(self, need_adapter: bool = False) -> list[RequiredPath]:
        """What a weight-loading build reads; `need_adapter`: stage 2 starts from a stage-1 checkpoint."""
        return [
            RequiredPath("model.detokenizer.pretrained_dir", "a diffusers SDXL base folder (unet/, vae/, scheduler/)",
                         self.pretrained_dir, "dir", required=not self.allow_random_init),
            RequiredPath("model.detokenizer.adapter_weights", "a stage-1 checkpoint (seedx_detok_pretrain's "
                         "last.ckpt or the official first_stage pytorch_model.bin)", self.adapter_weights,
                         required=need_adapter and not self.allow_random_init),
        ]

    def check_weights_present(self) -> None:
        """Full-size runs must start from SDXL weights: say which key to set when they are missing."""
        check_paths(self.required_paths()[:1])  # the SDXL folder; the same table as the pre-run check


def component_config(cfg: DetokenizerConfig, name: str, load_weights: bool = True) -> dict[str, Any]:
    """The diffusers config of `name` ("unet", "vae"): the SDXL folder's `name/config.json` when weights load
    from it (what `from_pretrained` would build), else `model.detokenizer.<name>`."""
    if load_weights and cfg.pretrained_dir:  # callers check the folder is there first (check_weights_present)
        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        return dict(cls.load_config(cfg.pretrained_dir, subfolder=name, local_files_only=True))
    return dict(getattr(cfg, name))


def build_unet(cfg: DetokenizerConfig, load_weights: bool = True) -> UNet2DConditionModel:
    """The UNet's architecture (no weights read: `diffusers_weight_sources` has them); build it under
    `src.utils.materialize.empty_init()` to get it on meta."""
    unet = UNet2DConditionModel.from_config(component_config(cfg, "unet", load_weights))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def build_vae(cfg: DetokenizerConfig, load_weights: bool = True) -> AutoencoderKL:
    """The VAE's architecture, fp32: SDXL's VAE overflows in fp16/bf16 (diffusers keeps it fp32 "to avoid NaN
    losses")."""
    return AutoencoderKL.from_config(component_config(cfg, "vae", load_weights)).float()


def diffusers_weight_sources(model: nn.Module, folder: str, name: str) -> dict[str, TensorSource]:
    """The tensors of a diffusers folder's `name/` component by `model`'s parameter names, nothing read yet:
    the file `from_pretrained` reads without a variant (sharded safetensors, safetensors, or a zip-format
    .bin, memory-mapped), old attention names renamed as diffusers renames them on load."""
    path = Path(folder) / name
    if (path / f"{WEIGHTS_STEM}.safetensors.index.json").exists():
        index = json.loads((path / f"{WEIGHTS_STEM}.safetensors.index.json").read_text())["weight_map"]
        sources: dict[str, TensorSource] = {k: SafetensorsTensor(path / f, k) for k, f in index.items()}
    else:
        files = [path / f"{WEIGHTS_STEM}{ext}" for ext in (".safetensors", ".bin")]
        found = next((f for f in files if f.exists()), None)
        if found is None:
            raise MissingWeightsError(f"model.detokenizer.pretrained_dir: {path} has neither "
                                      f"{' nor '.join(f.name for f in files)} (a diffusers SDXL base folder)")
        sources = state_dict_file(found)
    rename = getattr(model, "_fix_state_dict_keys_on_load", None)  # diffusers' own renaming (a private method)
    return rename(sources) if rename is not None else sources


def encode_posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE posterior of `pixels` in [-1, 1], computed in fp32 also under bf16 autocast (bf16-mixed
    training would otherwise run the encoder convs, and so latents and targets, in bf16)."""
    with torch.autocast(device_type=pixels.device.type, enabled=False):
        return vae.encode(pixels.float()).latent_dist


def hold_decoder_in(vae: AutoencoderKL, dtype: torch.dtype) -> None:
    """Cast only the decoding half (post_quant_conv + decoder): the encoder stays fp32 for the latents
    training learns from; decoding runs only for sample grids, and bf16 has fp32's range (no overflow)."""
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.to(dtype)
    vae.decoder.to(dtype)


def build_noise_scheduler(cfg: DetokenizerConfig) -> DDPMScheduler:
    # Training noise follows DDPM with SDXL's betas; the sampler used at inference is chosen separately.
    return DDPMScheduler.from_config(dict(cfg.scheduler))


def widen_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> None:
    """InstructPix2Pix widening: keep the old weights and bias, zero-init the new input channels.

    Zero new channels make the widened UNet compute exactly what it did before (diffusers #4960 lost
    the bias; we copy it). The saved config says the new channel count so the model reloads.
    """
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


def is_attention_kv(name: str) -> bool:
    """to_k / to_v of every UNet attention (self and cross): what stage 1 fine-tunes in the UNet."""
    return ".to_k." in name or ".to_v." in name


def adapter_checkpoint_sources(path: str | None, key: str = "model.detokenizer.adapter_weights"
                               ) -> dict[str, TensorSource]:
    """The `resampler.*` / `unet.*` tensors of a de-tokenizer checkpoint, official (`pytorch_model.bin`,
    safetensors) or ours (a Lightning .ckpt: its `state_dict`), memory-mapped where the format allows, so a
    rank reads only the rows of its shards (the official first stage may hold a whole SDXL UNet)."""
    if not path or not Path(path).exists():
        raise missing_weights_error(key, "a de-tokenizer checkpoint", path)
    if str(path).endswith(".safetensors"):
        sources = state_dict_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mapped: read in full
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        sources = {k: HeldTensor(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in sources.items() if k.startswith(("resampler.", "unet."))}
