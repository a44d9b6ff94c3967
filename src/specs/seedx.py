"""The SEED-X MLLM's spec: frozen Qwen-VL ViT, Llama-2 (+ LoRA) and the agent's resamplers.

`SeedXRecipe` builds them on meta and fills every parameter from its source (local weight files, read shard
by shard, or its tower's seeded random init); `SeedXSFTRecipe` starts from a pre-trained SEED-X
(src/specs/pretrained_start.py, or a `python -m src.export` folder). `SeedXModel` / `SeedXSFTModel` are the
plain models inference builds; src/stages/mllm_pretrain.py and mllm_sft.py add the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from src.data.mllm import load_tokenizer
from src.models.mllm import (
    LORA_TARGETS,
    AgentConfig,
    LLMConfig,
    SeedXMLLM,
    agent_weight_sources,
    apply_lora,
    build_llm,
    llm_weight_sources,
)
from src.models.qwen_vit import QwenViT, QwenViTConfig, build_vit, vit_weight_sources
from src.specs.base import ModelSpec, Recipe, SpecModel
from src.specs.pretrained_start import PretrainedStart, sft_if_started
from src.utils.constraints import ConfigValueError, PositiveInt
from src.utils.materialize import TensorSource, empty_init, prefixed
from src.utils.weights import RequiredPath, missing_weights_error


@dataclass
class SeedXConfig:
    """The typed model config of a SEED-X stage: `model.{vit,llm,agent}` and the stage's model arguments."""

    vit: QwenViTConfig
    llm: LLMConfig
    agent: AgentConfig
    lora: dict = field(default_factory=lambda: {"enabled": False})
    full_finetune: bool = False
    vit_chunk_size: PositiveInt = 16
    init_seed: int = 0

    @classmethod
    def from_args(cls, model: dict, lora: dict | None = None, full_finetune: bool = False,
                  vit_chunk_size: int = 16, init_seed: int = 0) -> SeedXConfig:
        """Parse and cross-check: a mistake fails before any model is built."""
        cfg = cls(QwenViTConfig(**model["vit"]), LLMConfig(**model["llm"]), AgentConfig(**model["agent"]),
                  dict(lora or {"enabled": False}), full_finetune, vit_chunk_size, init_seed)
        cfg.agent.check_against(cfg.llm.config["hidden_size"], cfg.vit.output_dim, cfg.vit.n_queries)
        if cfg.lora.get("enabled") and full_finetune:
            raise ConfigValueError("full_finetune", "stage.lora.enabled and stage.full_finetune are both true: pick one")
        return cfg


class SeedXRecipe(Recipe):
    stage_name = "pretrain"
    builds_empty = True

    def configure(self, cfg: SeedXConfig) -> None:
        self.vit_cfg, self.llm_cfg, self.agent_cfg = cfg.vit, cfg.llm, cfg.agent
        self.lora_cfg = cfg.lora
        self.full_finetune = cfg.full_finetune
        self.vit_chunk_size = cfg.vit_chunk_size
        self.init_seed = cfg.init_seed
        self.tokenizer = None

    def build_empty(self, load_weights: bool = True) -> None:
        """ViT, LLM (+ LoRA) and agent with parameters on meta, trainability set; reads no weights."""
        self._vocab = None
        if load_weights:
            if not self.llm_cfg.weights and not self.llm_cfg.allow_random_init:
                raise missing_weights_error("model.llm.weights", "a local Llama-2-chat HF folder")
            self.tokenizer = load_tokenizer(self.llm_cfg.tokenizer_path, "model.llm.tokenizer")
            self._vocab = len(self.tokenizer)
        with empty_init():
            self.vit = QwenViT(self.vit_cfg)
            llm = build_llm(self.llm_cfg, self._vocab, folder_config=load_weights)
            llm.requires_grad_(self.full_finetune)
            if self.lora_cfg.get("enabled"):
                llm = apply_lora(
                    llm, self.lora_cfg["r"], self.lora_cfg["alpha"], self.lora_cfg["dropout"],
                    self.lora_cfg.get("targets") or LORA_TARGETS,
                )
            self.mllm = SeedXMLLM(llm, self.agent_cfg)
        self.freeze_towers()

    def weight_sources(self, load_weights: bool = True) -> dict[str, TensorSource]:
        """Every parameter's initial value: local weight files (read shard by shard) or its tower's own seeded
        random init (stage.init_seed), so every rank and every resume starts from the same model."""
        allow_random = self.llm_cfg.allow_random_init
        vit_cfg = self.vit_cfg if load_weights else replace(self.vit_cfg, weights=None)
        vit = vit_weight_sources(vit_cfg, allow_random or not load_weights, self.init_seed)
        llm = llm_weight_sources(self.mllm.llm, self.llm_cfg, self._vocab, load_weights, self.init_seed)
        width = self.mllm.llm.get_input_embeddings().weight.shape[1]
        agent_cfg = self.agent_cfg if load_weights else replace(self.agent_cfg, weights=None)
        agent = agent_weight_sources(agent_cfg, width, self.init_seed)
        return {**prefixed(vit, "vit."), **prefixed(llm, "mllm.llm."), **prefixed(agent, "mllm.")}

    def required_paths(self) -> list[RequiredPath]:
        return (self.vit_cfg.required_paths(self.llm_cfg.allow_random_init) + self.llm_cfg.required_paths()
                + self.agent_cfg.required_paths())

    def build_frozen_encoders(self) -> dict[str, torch.nn.Module]:
        """The frozen ViT exactly as `build_models(load_weights=True)` makes it (its own tower seed, then
        `model.vit.weights`), without the LLM: for data_prep/precompute_features.py."""
        return {"vit": build_vit(self.vit_cfg, self.llm_cfg.allow_random_init, self.init_seed)}

    def report_modules(self) -> dict:
        m = self.mllm
        out = {"vit": self.vit, "mllm.llm": m.llm, "mllm.input_resampler": m.input_resampler,
               "mllm.output_resampler": m.output_resampler}
        if self.agent_cfg.add_patch_pos:
            out["mllm.patch_pos_embed"] = m.patch_pos_embed
        return out


class SeedXSFTRecipe(PretrainedStart, SeedXRecipe):
    """Instruction tuning's start: a seedx_pretrain checkpoint (its LoRA merged or kept), or a
    `python -m src.export` folder whose parts become the weight paths."""

    stage_name = "sft"
    init_from_family = "seedx_mllm"  # what stage.init_from must be (checked before any build)
    init_from_what = "a seedx_pretrain checkpoint (.ckpt or sharded dir) or src.export folder"

    def configure_start(self, init_from: str | None = None, pretrain_lora: str = "merge") -> None:
        super().configure_start(init_from, pretrain_lora)
        root = Path(self.init_from) if self.init_from else None
        self.init_from_export = bool(root and (root / "llm").is_dir() and (root / "agent").is_dir())
        if self.init_from_export:  # a `python -m src.export` folder: its parts are the weight paths
            self.llm_cfg = replace(self.llm_cfg, weights=str(root / "llm"), tokenizer=str(root / "llm"), adapter=None,
                                   allow_random_init=False)
            self.agent_cfg = replace(self.agent_cfg, weights=str(root / "agent" / "model.safetensors"))
            self.vit_cfg = replace(self.vit_cfg, weights=str(root / "vit" / "model.safetensors"))


class SeedXModel(SeedXRecipe, SpecModel):
    """The SEED-X MLLM for inference (`vit`, `mllm`, `tokenizer`), state dict keys as the stage's."""

    def __init__(self, model: dict, lora: dict | None = None, full_finetune: bool = False,
                 vit_chunk_size: int = 16, init_seed: int = 0) -> None:
        nn.Module.__init__(self)
        self.configure(SeedXConfig.from_args(model, lora, full_finetune, vit_chunk_size, init_seed))


class SeedXSFTModel(SeedXSFTRecipe, SeedXModel):
    def __init__(self, model: dict, lora: dict | None = None, full_finetune: bool = False, vit_chunk_size: int = 16,
                 init_seed: int = 0, init_from: str | None = None, pretrain_lora: str = "merge") -> None:
        SeedXModel.__init__(self, model, lora, full_finetune, vit_chunk_size, init_seed)
        self.configure_start(init_from, pretrain_lora)


SEEDX = ModelSpec(
    name="seedx_mllm",
    config_classes={"vit": QwenViTConfig, "llm": LLMConfig, "agent": AgentConfig},
    stages={"pretrain": SeedXModel, "sft": SeedXSFTModel},
    frozen=("vit",),
    fsdp_blocks=("transformers.models.llama.modeling_llama.LlamaDecoderLayer",
                 "src.models.qwen_vit.VisualAttentionBlock"),
    stage_by_args=sft_if_started,
)
SeedXRecipe.spec = SEEDX
