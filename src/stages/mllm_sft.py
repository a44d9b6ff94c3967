"""SEED-X instruction tuning (SEED-X-I, -Edit, -PPT, -Story, -Try-on): the pre-training stage, started from
a pre-trained SEED-X, with a fresh LoRA for the task.

Paper §3.3.2 / App. B: "we fine-tune a LoRA module on the pre-trained model, and optimize the parameters
of the input cross-attention layer, output cross-attention layer, extrapolatable 2D positional embeddings,
and LoRA". The loss, batch contract and models are `MLLMPretrainModule`'s; only where the weights start
differs. Three starts:

* `stage.init_from`: our `seedx_pretrain` checkpoint (`.ckpt` or a sharded directory). Its trained tensors
  (resamplers, patch positions, embeddings, norms, lm_head; the whole LLM after a full fine-tune) replace
  the initial ones; its LoRA is, by `stage.pretrain_lora`,
  - `merge` (default): folded into the frozen base weights (W + B·A·α/r), under a fresh task LoRA;
  - `keep`: kept as a second, frozen adapter (`pretrain`) that stays active under the task adapter.
  The towers that are not in the checkpoint (frozen ViT and Llama base) come from the experiment's weight
  paths, or for random-init tiny twins from the checkpoint's own `init_seed`, so they equal what it was
  trained on.
* `stage.init_from` = an exported folder (`python -m src.export`: `llm/` merged, `agent/`, `vit/`): its parts
  become `model.llm.weights` (and tokenizer), `model.agent.weights` and `model.vit.weights`.
* the official SEED-X weights: no `init_from`; point the model paths at them (`model.llm.weights` the merged
  HF folder `pretrained/seed_x/llm`, `model.agent.weights` the agent `.bin`, `model.vit.weights`), exactly as
  `src.generate` loads them.

The start is the model spec's (src/specs/seedx.py `SeedXSFTRecipe`); all of it happens in `weight_sources`,
so under FSDP2 each rank still reads only its shards; a resume rebuilds the same start and then loads the run's own checkpoint over it.
"""

from __future__ import annotations

from typing import Literal

from src.specs.pretrained_start import PRETRAIN_LORA_MODES, MergedLoRA
from src.specs.seedx import SeedXSFTRecipe
from src.stages.base import PretrainedStartConfig
from src.stages.mllm_pretrain import MLLMPretrainConfig, MLLMPretrainModule


class MLLMSFTConfig(PretrainedStartConfig, MLLMPretrainConfig):
    pass


class MLLMSFTModule(SeedXSFTRecipe, MLLMPretrainModule):
    """Pre-training's losses and step; the start (stage.init_from, pretrain_lora) is the spec's."""

    config_model = MLLMSFTConfig

    def __init__(self, *args, init_from: str | None = None, pretrain_lora: Literal["merge", "keep"] = "merge",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.configure_start(init_from, pretrain_lora)


__all__ = ["PRETRAIN_LORA_MODES", "MLLMSFTModule", "MergedLoRA"]
