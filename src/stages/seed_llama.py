"""SEED-LLaMA: next-token cross-entropy over text and discrete SEED image codes, LoRA (r 16, alpha 32) or full
fine-tuning of a Llama whose vocabulary gained the 8192 codes + `<img>`/`</img>` (src/models/vocab.py).

Pre-training (`seed_llama_pretrain`): interleaved documents and caption pairs in both directions, every token
supervised. Instruction tuning (`seed_llama_sft`, `SeedLlamaSFTModule`): chats, CE on assistant turns only,
started from a `seed_llama_pretrain` checkpoint (`stage.init_from`; its LoRA merged or kept, the SEED-X SFT
machinery of `src/specs/pretrained_start.py`).

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

from src.specs.seed_llama import SeedLlamaConfig, SeedLlamaRecipe, SeedLlamaSFTRecipe
from src.stages.base import LoraConfig, PretrainedStartConfig, StageConfig, StageModule


class SeedLlamaStageConfig(StageConfig):
    lora: LoraConfig | None = None
    full_finetune: bool = False
    init_seed: int = 0
    new_rows: Literal["normal", "mean"] = "normal"
    # lora vs full_finetune is cross-checked once, by the spec (SeedLlamaConfig.from_args), when the stage is built


class SeedLlamaSFTStageConfig(PretrainedStartConfig, SeedLlamaStageConfig):
    pass


class SeedLlamaModule(SeedLlamaRecipe, StageModule):
    """SEED-LLaMA's loss; its model is the spec's (src/specs/seed_llama.py)."""

    config_model = SeedLlamaStageConfig

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", lora: dict | None = None, full_finetune: bool = False,
                 init_seed: int = 0, new_rows: str = "normal") -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.configure(SeedLlamaConfig.from_args(model, lora, full_finetune, init_seed, new_rows))

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        out = self.mllm(input_ids=batch["input_ids"], labels=batch["labels"],
                        attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        return {k: v for k, v in out.items() if k != "logits"}


class SeedLlamaSFTModule(SeedLlamaSFTRecipe, SeedLlamaModule):
    """Pre-training's loss; the start (stage.init_from, pretrain_lora) is the spec's."""

    config_model = SeedLlamaSFTStageConfig

    def __init__(self, *args, init_from: str | None = None, pretrain_lora: Literal["merge", "keep"] = "merge",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.configure_start(init_from, pretrain_lora)


__all__ = ["SeedLlamaModule", "SeedLlamaSFTModule"]
