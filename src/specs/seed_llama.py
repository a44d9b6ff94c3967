"""SEED-LLaMA's spec: a Llama (+ LoRA) whose vocabulary gained the 8192 SEED image codes + `<img>`/`</img>`.

The LLM is built on meta and filled from `model.llm.weights` shard by shard (FSDP2 ranks read only their
shards). New vocabulary rows (a text-only Llama / Vicuna start) get normal(0, 0.02) as released
(`stage.new_rows: normal`; `mean` for SEED-X's mean / 3x mean); a released SEED-LLaMA folder with its
tokenizer (seed-tokenizer-2) already holds them, and every image token's id is looked up by its name.
Instruction tuning starts from a `seed_llama_pretrain` checkpoint (src/specs/pretrained_start.py).
`SeedLlamaModel` / `SeedLlamaSFTModel` are the plain models inference builds; src/stages/seed_llama.py adds the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from src.data.mllm import load_tokenizer
from src.models.mllm import LORA_TARGETS, LLMConfig, apply_lora, build_llm, check_new_rows, llm_weight_sources
from src.models.seed_llama import SeedLlama
from src.models.vocab import NUM_IMAGE_CODES, SEED_LLAMA_TOKENS, add_seed_llama_tokens, seed_llama_token_ids
from src.specs.base import ModelSpec, Recipe, SpecModel
from src.specs.pretrained_start import PretrainedStart, sft_if_started
from src.utils.constraints import ConfigValueError
from src.utils.materialize import TensorSource, empty_init, prefixed
from src.utils.weights import RequiredPath, missing_weights_error


@dataclass
class SeedLlamaConfig:
    """The typed model config of a SEED-LLaMA stage: `model.llm` and the stage's model arguments."""

    llm: LLMConfig
    lora: dict = field(default_factory=lambda: {"enabled": False})
    full_finetune: bool = False
    init_seed: int = 0
    new_rows: str = "normal"

    @classmethod
    def from_args(cls, model: dict, lora: dict | None = None, full_finetune: bool = False, init_seed: int = 0,
                  new_rows: str = "normal") -> SeedLlamaConfig:
        cfg = cls(LLMConfig(**model["llm"]), dict(lora or {"enabled": False}), full_finetune, init_seed,
                  check_new_rows(new_rows))
        if cfg.lora.get("enabled") and full_finetune:
            raise ConfigValueError("full_finetune", "stage.lora.enabled and stage.full_finetune are both true: pick one")
        if not cfg.lora.get("enabled") and not full_finetune:
            raise ConfigValueError("full_finetune",
                                   "nothing would train: set stage.lora.enabled=true or stage.full_finetune=true")
        return cfg


class SeedLlamaRecipe(Recipe):
    stage_name = "pretrain"
    builds_empty = True

    def configure(self, cfg: SeedLlamaConfig) -> None:
        self.llm_cfg, self.lora_cfg = cfg.llm, cfg.lora
        self.full_finetune = cfg.full_finetune
        self.init_seed = cfg.init_seed
        self.new_rows = cfg.new_rows
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

    def report_modules(self) -> dict:
        return {"mllm.llm": self.mllm.llm}


class SeedLlamaSFTRecipe(PretrainedStart, SeedLlamaRecipe):
    stage_name = "sft"
    init_from_family = "seed_llama"  # what stage.init_from must be (checked before any build)
    init_from_what = "a seed_llama_pretrain checkpoint (.ckpt or sharded dir)"


class SeedLlamaModel(SeedLlamaRecipe, SpecModel):
    """SEED-LLaMA for inference (`mllm.llm`, `tokenizer`), state dict keys as the stage's."""

    def __init__(self, model: dict, lora: dict | None = None, full_finetune: bool = False, init_seed: int = 0,
                 new_rows: str = "normal") -> None:
        nn.Module.__init__(self)
        self.configure(SeedLlamaConfig.from_args(model, lora, full_finetune, init_seed, new_rows))


class SeedLlamaSFTModel(SeedLlamaSFTRecipe, SeedLlamaModel):
    def __init__(self, model: dict, lora: dict | None = None, full_finetune: bool = False, init_seed: int = 0,
                 new_rows: str = "normal", init_from: str | None = None, pretrain_lora: str = "merge") -> None:
        SeedLlamaModel.__init__(self, model, lora, full_finetune, init_seed, new_rows)
        self.configure_start(init_from, pretrain_lora)


SEED_LLAMA = ModelSpec(
    name="seed_llama",
    config_classes={"llm": LLMConfig},
    stages={"pretrain": SeedLlamaModel, "sft": SeedLlamaSFTModel},
    fsdp_blocks=("transformers.models.llama.modeling_llama.LlamaDecoderLayer",),
    stage_by_args=sft_if_started,
)
SeedLlamaRecipe.spec = SEED_LLAMA
