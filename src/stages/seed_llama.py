"""SEED-LLaMA: next-token cross-entropy over text and discrete SEED image codes, LoRA (r 16, alpha 32) or full
fine-tuning of a Llama whose vocabulary gained the 8192 codes + `<img>`/`</img>` (src/models/vocab.py).

Pre-training (`seed_llama_pretrain`): interleaved documents and caption pairs in both directions, every token
supervised. Instruction tuning (`seed_llama_sft`, `SeedLlamaSFTModule`): chats, CE on assistant turns only,
started from a `seed_llama_pretrain` checkpoint (`stage.init_from`; its LoRA merged or kept, the SEED-X SFT
machinery of `src/stages/pretrained_start.py`).

The LLM is built on meta and filled from `model.llm.weights` shard by shard (FSDP2 ranks read only their
shards). New vocabulary rows (a text-only Llama / Vicuna start) get normal(0, 0.02) as released
(`stage.new_rows: normal`; `mean` for SEED-X's mean / 3x mean); a released SEED-LLaMA folder with its
tokenizer (seed-tokenizer-2) already holds them, and every image token's id is looked up by its name.
Images arrive as token ids, so no vision tower runs in training (`python -m data_prep.tokenize_images`
wrote the codes).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from src.data.mllm import load_tokenizer
from src.models.mllm import LORA_TARGETS, LLMConfig, apply_lora, build_llm, check_new_rows, llm_weight_sources
from src.models.seed_llama import SeedLlama
from src.models.vocab import NUM_IMAGE_CODES, SEED_LLAMA_TOKENS, add_seed_llama_tokens, seed_llama_token_ids
from src.stages.base import LoraConfig, StageConfig, StageModule
from src.stages.pretrained_start import PretrainedStart, PretrainedStartConfig
from src.utils.constraints import ConfigValueError
from src.utils.materialize import TensorSource, empty_init, prefixed
from src.utils.weights import RequiredPath, missing_weights_error


class SeedLlamaConfig(StageConfig):
    lora: LoraConfig | None = None
    full_finetune: bool = False
    init_seed: int = 0
    new_rows: Literal["normal", "mean"] = "normal"

    @model_validator(mode="after")
    def _one_way_to_train(self):
        lora = self.lora is not None and self.lora.enabled
        if lora and self.full_finetune:
            raise ConfigValueError("full_finetune", "stage.lora.enabled and stage.full_finetune are both true: pick one")
        if not lora and not self.full_finetune:
            raise ConfigValueError("full_finetune",
                                   "nothing would train: set stage.lora.enabled=true or stage.full_finetune=true")
        return self


class SeedLlamaSFTConfig(PretrainedStartConfig, SeedLlamaConfig):
    pass


class SeedLlamaModule(StageModule):

    config_model = SeedLlamaConfig
    checkpoint_family = "seed_llama"  # written into its checkpoints (src/utils/checkpoint_kind.py)
    fsdp_blocks = ("transformers.models.llama.modeling_llama.LlamaDecoderLayer",)
    builds_empty = True

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", lora: dict | None = None, full_finetune: bool = False,
                 init_seed: int = 0, new_rows: str = "normal") -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        self.new_rows = check_new_rows(new_rows)
        self.llm_cfg = LLMConfig(**model["llm"])
        self.lora_cfg = dict(lora or {"enabled": False})
        self.full_finetune = full_finetune
        self.init_seed = init_seed
        self.tokenizer = None

    def required_paths(self) -> list[RequiredPath]:
        return self.llm_cfg.required_paths()

    def build_empty(self, load_weights: bool = True) -> None:
        """The Llama (+ LoRA) with parameters on meta, vocabulary extended; reads no weights."""
        if load_weights:
            if not self.llm_cfg.weights and not self.llm_cfg.allow_random_init:
                raise missing_weights_error("model.llm.weights", "a local Llama HF folder")
            self.tokenizer = load_tokenizer(self.llm_cfg.tokenizer_path, "model.llm.tokenizer",
                                            extend=add_seed_llama_tokens)
            self._vocab = len(self.tokenizer)
            # a released tokenizer (seed-tokenizer-2) holds the tokens already: their ids are looked up by name
            codes = seed_llama_token_ids(self.tokenizer).codes
        else:  # meta / inspect: the base vocabulary, then the new tokens in their fixed order
            self._vocab = int(self.llm_cfg.config["vocab_size"]) + len(SEED_LLAMA_TOKENS)
            first = int(self.llm_cfg.config["vocab_size"])
            codes = tuple(range(first, first + NUM_IMAGE_CODES))
        with empty_init():
            llm = build_llm(self.llm_cfg, self._vocab, folder_config=load_weights, new_rows=self.new_rows)
            llm.requires_grad_(self.full_finetune)
            if self.lora_cfg.get("enabled"):
                llm = apply_lora(llm, self.lora_cfg["r"], self.lora_cfg["alpha"], self.lora_cfg["dropout"],
                                 self.lora_cfg.get("targets") or LORA_TARGETS)
            self.mllm = SeedLlama(llm, codes)

    def weight_sources(self, load_weights: bool = True) -> dict[str, TensorSource]:
        llm = llm_weight_sources(self.mllm.llm, self.llm_cfg, self._vocab, load_weights, self.init_seed,
                                 self.new_rows)
        return prefixed(llm, "mllm.llm.")

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        out = self.mllm(input_ids=batch["input_ids"], labels=batch["labels"],
                        attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        return {k: v for k, v in out.items() if k != "logits"}

    def report_modules(self) -> dict:
        return {"mllm.llm": self.mllm.llm}


class SeedLlamaSFTModule(PretrainedStart, SeedLlamaModule):

    config_model = SeedLlamaSFTConfig
    init_from_family = "seed_llama"  # what stage.init_from must be (checked before any build)
    init_from_what = "a seed_llama_pretrain checkpoint (.ckpt or sharded dir)"


__all__ = ["SeedLlamaModule", "SeedLlamaSFTModule"]
