"""SEED-X MLLM pre-training: next-token CE + 6.0 x MSE regression of ViT features, LoRA on Llama-2.

The frozen ViT encodes every view (tiles + global) of the batch; comprehension views feed the input
resampler, generation targets give the avg-pooled 64 x 4096 regression target. Precomputed features
(`batch["vit_features"]`, `data.features_dir`) skip the ViT.

Ranks whose batches differ in modality (FSDP2): every rank runs every sharded module every step. The
resamplers take a zero-weight dummy pass when a batch has nothing for them (SeedXMLLM); the frozen ViT
stays sharded (1.9B params: replicated it would cost each GPU more memory than its share of the 13B LLM)
and every rank makes as many ViT calls per step as the rank with the most view chunks (one scalar
all-reduce; the others encode a dummy view), see `src.parallel.same_call_count`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import model_validator

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
from src.models.vocab import NUM_SEEDX_TOKENS
from src.parallel import same_call_count
from src.stages.base import LoraConfig, StageConfig, StageModule
from src.utils.constraints import ConfigValueError, PositiveInt
from src.utils.flops import mllm_step_flops
from src.utils.materialize import TensorSource, empty_init, prefixed
from src.utils.weights import RequiredPath, missing_weights_error


class MLLMPretrainConfig(StageConfig):
    lora: LoraConfig | None = None
    full_finetune: bool = False
    vit_chunk_size: PositiveInt = 16
    init_seed: int = 0

    @model_validator(mode="after")
    def _one_way_to_train(self):
        if self.lora is not None and self.lora.enabled and self.full_finetune:
            raise ConfigValueError("full_finetune", "stage.lora.enabled and stage.full_finetune are both true: pick one")
        return self


class MLLMPretrainModule(StageModule):

    config_model = MLLMPretrainConfig
    checkpoint_family = "seedx_mllm"  # written into its checkpoints (src/utils/checkpoint_kind.py)
    frozen_towers = ("vit",)
    fsdp_blocks = (
        "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
        "src.models.qwen_vit.VisualAttentionBlock",
    )

    def __init__(
        self,
        model: dict,
        optimizer,
        scheduler: dict | None = None,
        checkpoint_frozen: bool = False,
        nonfinite_loss: str = "skip",
        lora: dict | None = None,
        full_finetune: bool = False,
        vit_chunk_size: int = 16,
        init_seed: int = 0,
    ) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse and cross-check configs first: a mistake fails before any model is built.
        self.vit_cfg = QwenViTConfig(**model["vit"])
        self.llm_cfg = LLMConfig(**model["llm"])
        self.agent_cfg = AgentConfig(**model["agent"])
        self.agent_cfg.check_against(
            self.llm_cfg.config["hidden_size"], self.vit_cfg.output_dim, self.vit_cfg.n_queries
        )
        self.lora_cfg = dict(lora or {"enabled": False})
        self.full_finetune = full_finetune
        self.vit_chunk_size = vit_chunk_size
        self.init_seed = init_seed
        self.tokenizer = None

    # ---- models -------------------------------------------------------------------------------------
    builds_empty = True

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

    def memory_estimate(self, world_size: int, micro_batch: int, seq_len: int, activation_checkpointing: bool):
        """Per-GPU memory under a sharded strategy (src/utils/memory.py); call after build_models."""
        from src.utils.memory import estimate_sharded_memory

        c = self.llm_cfg.config
        params = list(self.parameters())
        units = [sum(p.numel() for p in layer.parameters()) for layer in self.mllm.llm.get_decoder().layers]
        root = sum(p.numel() for p in params) - sum(units) - sum(p.numel() for p in self.vit.parameters())
        return estimate_sharded_memory(
            total_params=sum(p.numel() for p in params),
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            largest_unit_params=max([root, *units]),
            world_size=world_size,
            tokens_per_gpu=micro_batch * seq_len,
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            vocab=self.mllm.llm.get_input_embeddings().weight.shape[0],
            activation_checkpointing=activation_checkpointing,
        )

    def report_modules(self) -> dict:
        m = self.mllm
        out = {"vit": self.vit, "mllm.llm": m.llm, "mllm.input_resampler": m.input_resampler,
               "mllm.output_resampler": m.output_resampler}
        if self.agent_cfg.add_patch_pos:
            out["mllm.patch_pos_embed"] = m.patch_pos_embed
        return out

    # ---- loss ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeds(self, batch: dict) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
        if "vit_features" in batch:
            return batch["vit_features"].to(dtype)
        pixels = batch["vit_pixels"]
        chunks = list(pixels.split(self.vit_chunk_size)) if pixels.shape[0] else []
        # Sharded ViT: as many calls as the busiest rank (each call all-gathers), agreed on before the
        # first one; the extra calls encode a dummy view.
        calls = same_call_count(self.vit, len(chunks), pixels.device)
        out = [self.vit(c.to(dtype)) for c in chunks]
        for _ in range(calls - len(chunks)):
            self.vit(pixels.new_zeros(1, *pixels.shape[1:]).to(dtype))
        if not out:
            return pixels.new_zeros(0, self.vit_cfg.n_queries, self.vit_cfg.output_dim, dtype=dtype)
        return torch.cat(out)

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        out = self.mllm(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            ids_cmp_mask=batch["ids_cmp_mask"],
            ids_gen_mask=batch["ids_gen_mask"],
            image_embeds=self.image_embeds(batch),
            embeds_cmp_mask=batch["embeds_cmp_mask"],
            embeds_gen_mask=batch["embeds_gen_mask"],
            patch_positions=batch["patch_positions"],
        )
        return {"loss": out["loss"], "loss_ce": out["loss_ce"], "loss_mse": out["loss_mse"]}

    # ---- throughput ---------------------------------------------------------------------------------
    def flops_per_batch(self, batch: dict):
        """Model FLOPs of a training step (src/utils/flops.py: LoRA-aware Llama + ViT + resamplers)."""
        if self.lora_cfg.get("enabled"):
            trainable, r = "lora", int(self.lora_cfg["r"])
        else:
            trainable, r = ("full" if self.full_finetune else "none"), 0
        if self.tokenizer is not None:
            vocab, pad = len(self.tokenizer), self.tokenizer.pad_token_id
        else:
            vocab, pad = int(self.llm_cfg.config["vocab_size"]) + NUM_SEEDX_TOKENS, None
        return mllm_step_flops(
            batch, llm_config=self.llm_cfg.config, vocab_size=vocab, vit_cfg=self.vit_cfg,
            agent_cfg=self.agent_cfg, pad_token_id=pad, lora_r=r,
            lora_targets=self.lora_cfg.get("targets") or LORA_TARGETS, trainable=trainable,
        )

    # ---- probes (sampling callback) ---------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, batch: dict, max_new_tokens: int = 32) -> list[int]:
        """Greedy continuation of one prompt sample (batch of 1).

        Full forward passes through `self.mllm` (no KV cache): slower than `generate`, but it goes through
        the root module's forward, so it works when FSDP2 has sharded the model (probes are short).
        """
        ids = batch["input_ids"]
        cmp_mask, gen_mask = batch["ids_cmp_mask"], batch["ids_gen_mask"]
        feats = self.image_embeds(batch)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.mllm(
                input_ids=ids, ids_cmp_mask=cmp_mask, ids_gen_mask=gen_mask, image_embeds=feats,
                embeds_cmp_mask=batch["embeds_cmp_mask"], embeds_gen_mask=batch["embeds_gen_mask"],
                patch_positions=batch["patch_positions"],
            )["logits"]
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            pad = torch.zeros(1, 1, dtype=torch.bool, device=ids.device)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            cmp_mask, gen_mask = torch.cat([cmp_mask, pad], 1), torch.cat([gen_mask, pad], 1)
        return new
