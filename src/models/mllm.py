"""SEED-X MLLM: a transformers Llama + input/output resamplers + 2-D patch positions (plain torch).

Parameter names follow the official `ContinuousLVLM` (`llm.*`, `input_resampler.*`,
`output_resampler.*`, `patch_pos_embed`), so official agent checkpoints load as they are.

forward() consumes the batch contract of src/data/mllm_collate.py with ViT features in place of
pixels: `image_embeds` (N, 256, vit_dim) for every view, `embeds_cmp_mask`/`embeds_gen_mask` (N,)
pick comprehension inputs and generation targets, `ids_cmp_mask`/`ids_gen_mask` (B, L) mark their
64-token spans. Loss = lm_loss_scale * CE + rec_loss_scale * MSE(output_resampler(h), avgpool(ViT)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from src.models.pos_emb import init_patch_pos_embed, patch_pos_term
from src.models.resampler import QwenResampler, ResamplerConfig
from src.models.vocab import NUM_SEEDX_TOKENS, init_new_embeddings
from src.utils.constraints import NonNegativeFloat, PositiveInt
from src.utils.materialize import (
    ExtendedRows,
    HeldTensor,
    NormalRows,
    TensorSource,
    clean_name,
    random_tower,
    safetensors_folder,
    seeded,
    state_dict_file,
    tower_seed,
)
from src.utils.weights import RequiredPath, missing_weights_error

# What an official agent checkpoint holds besides the LLM.
AGENT_KEY_PREFIXES = ("input_resampler.", "output_resampler.", "patch_pos_embed")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LLMConfig:
    """`config` is a transformers LlamaConfig dict (Llama-2-chat-13B at full size, a tiny twin in tests)."""

    config: dict[str, Any]
    weights: str | None = None  # local HF folder (config.json + safetensors)
    tokenizer: str | None = None  # local tokenizer folder; defaults to `weights`
    # A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. `src.export`'s lora/)
    # on top of `weights`: its LoRA and modules_to_save tensors replace the initial ones.
    adapter: str | None = None
    allow_random_init: bool = False
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.weights

    def required_paths(self) -> list[RequiredPath]:
        """What a weight-loading build reads: the HF folder (unless random init) and the tokenizer folder."""
        own_tokenizer = bool(self.tokenizer) and self.tokenizer != self.weights
        paths = [RequiredPath("model.llm.weights", "a local Llama-2-chat HF folder" + (
            "" if own_tokenizer else " (with its tokenizer files)"), self.weights, "dir",
            required=not (self.allow_random_init and own_tokenizer))]
        if own_tokenizer:
            paths.append(RequiredPath("model.llm.tokenizer", "a local tokenizer folder", self.tokenizer, "dir"))
        if self.adapter:
            paths.append(RequiredPath("model.llm.adapter", "a PEFT adapter folder", self.adapter, "dir"))
        return paths

    def hf_config(self) -> LlamaConfig:
        return LlamaConfig(**self.config, attn_implementation=self.attn_implementation)


@dataclass
class AgentConfig:
    """The SEED-X wrapper around the LLM (official agent_seed_x.yaml)."""

    input_resampler: dict[str, Any] = field(default_factory=dict)
    output_resampler: dict[str, Any] = field(default_factory=dict)
    add_patch_pos: bool = True
    lm_loss_scale: NonNegativeFloat = 1.0
    rec_loss_scale: NonNegativeFloat = 6.0
    gen_pool_kernel: PositiveInt = 4  # 256 ViT tokens -> 64 regression targets (1-D avg-pool, official vit_down)
    weights: str | None = None  # official agent pytorch_model.bin (resamplers + patch_pos_embed)

    def required_paths(self) -> list[RequiredPath]:
        return [RequiredPath("model.agent.weights", "the official agent pytorch_model.bin", self.weights, required=False)]

    def __post_init__(self) -> None:
        self.input_cfg = ResamplerConfig(**self.input_resampler)
        self.output_cfg = ResamplerConfig(**self.output_resampler)
        if self.rec_loss_scale < 0 or self.lm_loss_scale < 0:
            raise ValueError("model.agent.lm_loss_scale / rec_loss_scale must be >= 0")

    def check_against(self, llm_width: int, vit_dim: int, vit_tokens: int) -> None:
        problems = []
        if self.output_cfg.num_queries * self.gen_pool_kernel != vit_tokens:
            problems.append(
                f"model.agent.output_resampler has {self.output_cfg.num_queries} queries but the ViT's "
                f"{vit_tokens} tokens pool (kernel {self.gen_pool_kernel}) to {vit_tokens // self.gen_pool_kernel}"
            )
        if self.input_cfg.embed_dim != llm_width:
            problems.append(f"model.agent.input_resampler.embed_dim={self.input_cfg.embed_dim} != LLM width {llm_width}")
        if (self.input_cfg.kv_dim or self.input_cfg.embed_dim) != vit_dim:
            problems.append(f"model.agent.input_resampler.kv_dim={self.input_cfg.kv_dim} != ViT dim {vit_dim}")
        if (self.output_cfg.kv_dim or self.output_cfg.embed_dim) != llm_width:
            problems.append(f"model.agent.output_resampler.kv_dim={self.output_cfg.kv_dim} != LLM width {llm_width}")
        if self.output_cfg.embed_dim != vit_dim:
            problems.append(f"model.agent.output_resampler.embed_dim={self.output_cfg.embed_dim} != ViT dim {vit_dim}")
        if problems:
            raise ValueError("; ".join(problems))


NEW_ROW_INITS = ("mean", "normal")


def check_new_rows(new_rows: str, key: str = "stage.new_rows") -> str:
    if new_rows not in NEW_ROW_INITS:
        raise ValueError(f"{key}: expected one of {NEW_ROW_INITS}, got {new_rows!r}")
    return new_rows


def build_llm(cfg: LLMConfig, vocab_size: int | None, folder_config: bool = True,
              new_rows: str = "mean") -> LlamaForCausalLM:
    """The Llama architecture, embeddings resized to `vocab_size`; no weights read (`llm_weight_sources` has
    them). Build it under `src.utils.materialize.empty_init()` to get it on meta. New rows: `mean` (SEED-X:
    mean / 3x mean of the old rows) or `normal` (SEED-LLaMA as released: plain `resize_token_embeddings`,
    normal(0, initializer_range)).

    `folder_config`: the architecture of `model.llm.weights`' config.json (what its tensors were saved
    from), else `model.llm.config`. `vocab_size=None`: base vocab + the 330 SEED-X tokens (no tokenizer).
    """
    if folder_config and cfg.weights:
        if not Path(cfg.weights).is_dir():
            raise missing_weights_error("model.llm.weights", "a local Llama-2 HF folder", cfg.weights)
        config = LlamaConfig.from_pretrained(cfg.weights, local_files_only=True)
        config._attn_implementation = cfg.attn_implementation
    else:
        config = cfg.hf_config()
    llm = LlamaForCausalLM(config)
    old = llm.get_input_embeddings().weight.shape[0]
    new = vocab_size if vocab_size is not None else old + NUM_SEEDX_TOKENS
    if new != old:
        # mean_resizing=False: we set the official init (mean / 3x mean) ourselves.
        llm.resize_token_embeddings(new, mean_resizing=False)  # new rows: normal(0, initializer_range)
        if check_new_rows(new_rows) == "mean":
            init_new_embeddings(llm, old)
    if cfg.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.config.use_cache = False
    return llm


def hf_key(name: str) -> str:
    """Our LLM parameter name (peft-wrapped or not) -> its key in the HF folder's safetensors."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def llm_weight_sources(llm: nn.Module, cfg: LLMConfig, vocab_size: int | None, load_weights: bool,
                       seed: int, new_rows: str = "mean") -> dict[str, TensorSource]:
    """What `materialize` fills the (meta-built, maybe peft-wrapped) LLM with, by our parameter names:

    - `model.llm.weights`' safetensors, read shard by shard; vocabulary rows past the file's get the SEED-X
      init (mean / 3x mean of the file's rows, as `init_new_embeddings` on a plain load), or with
      `new_rows="normal"` normal(0, initializer_range) under their own seed (SEED-LLaMA as released);
    - without weights (tiny twins), the random init of the "llm" tower seed;
    - LoRA: peft's default init (`init_lora_weights=True`: A Kaiming-uniform a=sqrt(5), B zero), each
      A drawn under its own seed so no shard depends on another.
    """
    if load_weights and cfg.weights:
        files = safetensors_folder(cfg.weights)
    elif load_weights and not cfg.allow_random_init:
        raise missing_weights_error("model.llm.weights", "a local Llama-2-chat HF folder")
    else:
        files = random_tower(lambda: build_llm(cfg, vocab_size, folder_config=False, new_rows=new_rows), seed,
                             "llm", "")
    out: dict[str, TensorSource] = {}
    for name, p in llm.named_parameters():
        name = clean_name(name)  # sources are asked for before or after AC wrapping alike
        if ".lora_A." in name:
            with seeded(seed, f"lora:{name}"):
                a = torch.empty(p.shape, dtype=p.dtype)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            out[name] = HeldTensor(a)
            continue
        if ".lora_B." in name:
            out[name] = HeldTensor(torch.zeros(p.shape, dtype=p.dtype))
            continue
        key = hf_key(name)
        if key == "lm_head.weight" and key not in files and llm.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        src = files.get(key)
        if src is not None and src.shape[0] < p.shape[0] and key in ("model.embed_tokens.weight", "lm_head.weight"):
            if check_new_rows(new_rows) == "normal":
                src = NormalRows(src, p.shape[0], llm.config.initializer_range, p.dtype,
                                 tower_seed(seed, f"new_rows:{key}"))
            else:
                src = ExtendedRows(src, p.shape[0], 3.0 if key == "lm_head.weight" else 1.0, p.dtype)
        if src is not None:
            out[name] = src
    if cfg.adapter and load_weights:
        out.update(adapter_weight_sources(llm, cfg.adapter))
    return out


def adapter_weight_sources(llm: nn.Module, folder: str) -> dict[str, TensorSource]:
    """A PEFT adapter's tensors by our parameter names; its LoRA shape must be the one the stage built
    (stage.lora), and every LoRA tensor must be in it: a mismatch names the keys."""
    import json

    from src.utils.weights import check_keys_and_shapes

    root = Path(folder)
    config_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise missing_weights_error("model.llm.adapter", "a PEFT adapter folder (adapter_config.json + "
                                    "adapter_model.safetensors)", folder)
    saved = json.loads(config_file.read_text())
    built = getattr(llm, "peft_config", {}).get("default")
    if built is None:
        raise ValueError("model.llm.adapter is set but stage.lora.enabled is false: enable LoRA with the adapter's r")
    for ours, theirs in (("r", "r"), ("alpha", "lora_alpha")):
        want = getattr(built, "lora_alpha" if ours == "alpha" else "r")
        if saved.get(theirs) != want:
            raise ValueError(f"model.llm.adapter has {theirs}={saved.get(theirs)} but stage.lora.{ours}={want}")
    files = state_dict_file(weights_file)
    own = {}
    for name, p in llm.named_parameters():
        name = clean_name(name)
        key = name.replace(".default.", ".")
        if ".lora_" in name or (".base_layer." not in name and key in files):
            own[key] = (name, tuple(p.shape))
    check_keys_and_shapes({k: shape for k, (_, shape) in own.items()},
                          {k: tuple(v.shape) for k, v in files.items()},
                          f"model.llm.adapter ({folder}) does not match the LoRA model:", "adapter")
    return {name: files[key] for key, (name, _) in own.items()}


def apply_lora(llm: nn.Module, r: int, alpha: int, dropout: float, targets=LORA_TARGETS) -> nn.Module:
    """peft LoRA on the attention and MLP projections; norms, embeddings and lm_head also train."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM")
    model = get_peft_model(llm, peft_cfg)
    for name, p in model.named_parameters():
        if "norm" in name or "embed_tokens" in name or "lm_head" in name:
            p.requires_grad_(True)
    return model


def agent_weight_sources(cfg: AgentConfig, llm_width: int, seed: int) -> dict[str, TensorSource]:
    """The resamplers and patch positions (names as in `SeedXMLLM`): `model.agent.weights` (the official
    agent checkpoint; its `llm.*` entries are the LLM's business), else each tower's own seeded init."""
    if cfg.weights:
        return {k: v for k, v in state_dict_file(cfg.weights).items() if k.startswith(AGENT_KEY_PREFIXES)}
    out = {**random_tower(lambda: QwenResampler(cfg.input_cfg), seed, "input_resampler", "input_resampler."),
           **random_tower(lambda: QwenResampler(cfg.output_cfg), seed, "output_resampler", "output_resampler.")}
    if cfg.add_patch_pos:
        with seeded(seed, "patch_pos_embed"):
            out["patch_pos_embed"] = HeldTensor(init_patch_pos_embed(llm_width).data)
    return out


class SeedXMLLM(nn.Module):
    def __init__(self, llm: nn.Module, cfg: AgentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        width = self.llm.get_input_embeddings().weight.shape[1]
        self.input_resampler = QwenResampler(cfg.input_cfg)
        self.output_resampler = QwenResampler(cfg.output_cfg)
        if cfg.add_patch_pos:
            self.patch_pos_embed = init_patch_pos_embed(width)

    # ---- pieces -------------------------------------------------------------------------------------
    def image_inputs(self, image_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ViT tokens of comprehension views -> (n, 64, width) LLM inputs with their 2-D position."""
        x = self.input_resampler(image_embeds)
        if self.cfg.add_patch_pos:
            x = x + patch_pos_term(positions, self.patch_pos_embed).unsqueeze(1).to(x.dtype)
        return x

    def regression_target(self, image_embeds: torch.Tensor) -> torch.Tensor:
        k = self.cfg.gen_pool_kernel
        return F.avg_pool1d(image_embeds.transpose(1, 2), kernel_size=k, stride=k).transpose(1, 2)

    def _dummy_resampler_term(self, resampler: QwenResampler, like: torch.Tensor) -> torch.Tensor:
        # Every rank must run every sharded module each step (FSDP collectives) and DDP expects every
        # parameter to get a gradient: a zero-weight pass when the batch has nothing for this resampler.
        kv_dim = resampler.cfg.kv_dim or resampler.cfg.embed_dim
        dummy = torch.zeros(1, resampler.cfg.num_queries, kv_dim, device=like.device, dtype=like.dtype)
        out = resampler(dummy).sum() * 0.0
        if resampler is self.input_resampler and self.cfg.add_patch_pos:
            out = out + self.patch_pos_embed.sum() * 0.0
        return out

    # ---- forward ------------------------------------------------------------------------------------
    def embed(self, input_ids, ids_cmp_mask, image_embeds, embeds_cmp_mask, patch_positions):
        embeds = self.llm.get_input_embeddings()(input_ids)
        extra = None
        if embeds_cmp_mask is not None and bool(embeds_cmp_mask.any()):
            img = self.image_inputs(image_embeds[embeds_cmp_mask], patch_positions[embeds_cmp_mask])
            n_pos = int(ids_cmp_mask.sum())
            if n_pos != img.shape[0] * img.shape[1]:
                raise ValueError(f"ids_cmp_mask marks {n_pos} positions but {img.shape[0]} views give {img.numel() // img.shape[-1]}")
            embeds = embeds.masked_scatter(ids_cmp_mask.unsqueeze(-1), img.to(embeds.dtype).reshape(-1, img.shape[-1]))
        else:
            extra = self._dummy_resampler_term(self.input_resampler, embeds)
        return embeds, extra

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        ids_cmp_mask: torch.Tensor | None = None,
        ids_gen_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        embeds_cmp_mask: torch.Tensor | None = None,
        embeds_gen_mask: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        embeds, dummy_in = self.embed(input_ids, ids_cmp_mask, image_embeds, embeds_cmp_mask, patch_positions)
        # A batch with no supervised token (e.g. image-only documents) would give HF's CE 0/0 = nan.
        has_ce = labels is not None and bool((labels[:, 1:] != -100).any())
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels if has_ce else None,
            output_hidden_states=True,
            use_cache=False,
        )
        ce = out.loss if has_ce else out.logits.sum() * 0.0
        hidden = out.hidden_states[-1]  # after the final RMSNorm, as official
        if embeds_gen_mask is not None and bool(embeds_gen_mask.any()):
            n = int(embeds_gen_mask.sum())
            h = hidden[ids_gen_mask].view(n, -1, hidden.shape[-1])
            pred = self.output_resampler(h)
            target = self.regression_target(image_embeds[embeds_gen_mask]).detach()
            mse = F.mse_loss(pred.float(), target.float())
        else:
            mse = self._dummy_resampler_term(self.output_resampler, hidden)
        loss = self.cfg.lm_loss_scale * ce + self.cfg.rec_loss_scale * mse
        if dummy_in is not None:
            loss = loss + dummy_in
        return {"loss": loss, "loss_ce": ce.detach(), "loss_mse": mse.detach(), "logits": out.logits}
