"""SEED-X MLLM: a transformers Llama + input/output resamplers + 2-D patch positions (plain torch).

Parameter names follow the official `ContinuousLVLM` (`llm.*`, `input_resampler.*`,
`output_resampler.*`, `patch_pos_embed`), so official agent checkpoints load as they are.

forward() consumes the batch contract of src/data/mllm_collate.py with ViT features in place of
pixels: `image_embeds` (N, 256, vit_dim) for every view, `embeds_cmp_mask`/`embeds_gen_mask` (N,)
pick comprehension inputs and generation targets, `ids_cmp_mask`/`ids_gen_mask` (B, L) mark their
64-token spans. Loss = lm_loss_scale * CE + rec_loss_scale * MSE(output_resampler(h), avgpool(ViT)).
"""

from __future__ import annotations

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
from src.utils.weights import RequiredPath, missing_weights_error

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LLMConfig:
    """`config` is a transformers LlamaConfig dict (Llama-2-chat-13B at full size, a tiny twin in tests)."""

    config: dict[str, Any]
    weights: str | None = None  # local HF folder (config.json + safetensors)
    tokenizer: str | None = None  # local tokenizer folder; defaults to `weights`
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


def build_llm(cfg: LLMConfig, vocab_size: int | None, load_weights: bool = True) -> LlamaForCausalLM:
    """Llama from local weights (or config), embeddings resized to `vocab_size` with SEED-X row init.

    `vocab_size=None` means base vocab + the 330 SEED-X tokens (used on the meta device, no tokenizer).
    """
    if load_weights and cfg.weights:
        if not Path(cfg.weights).is_dir():
            raise missing_weights_error("model.llm.weights", "a local Llama-2 HF folder", cfg.weights)
        llm = LlamaForCausalLM.from_pretrained(
            cfg.weights, local_files_only=True, attn_implementation=cfg.attn_implementation, dtype=torch.float32
        )
    elif load_weights and not cfg.allow_random_init:
        raise missing_weights_error("model.llm.weights", "a local Llama-2-chat HF folder")
    else:
        llm = LlamaForCausalLM(cfg.hf_config())
    old = llm.get_input_embeddings().weight.shape[0]
    new = vocab_size if vocab_size is not None else old + NUM_SEEDX_TOKENS
    if new != old:
        # mean_resizing=False: we set the official init (mean / 3x mean) ourselves.
        llm.resize_token_embeddings(new, mean_resizing=False)
        init_new_embeddings(llm, old)
    if cfg.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.config.use_cache = False
    return llm


def apply_lora(llm: nn.Module, r: int, alpha: int, dropout: float, targets=LORA_TARGETS) -> nn.Module:
    """peft LoRA on the attention and MLP projections; norms, embeddings and lm_head also train."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM")
    model = get_peft_model(llm, peft_cfg)
    for name, p in model.named_parameters():
        if "norm" in name or "embed_tokens" in name or "lm_head" in name:
            p.requires_grad_(True)
    return model


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
