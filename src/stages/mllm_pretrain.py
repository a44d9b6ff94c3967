"""SEED-X MLLM pre-training: next-token CE + 6.0 x MSE regression of ViT features, LoRA on Llama-2.

The frozen ViT encodes every view (tiles + global) of the batch; comprehension views feed the input
resampler, generation targets give the avg-pooled 64 x 4096 regression target. Precomputed features
(`batch.vit_features`, `data.features_dir`) skip the ViT (`src.data.batch.FrozenInputs` decides).

Ranks whose batches differ in modality (FSDP2): every rank runs every sharded module every step. The
resamplers take a zero-weight dummy pass when a batch has nothing for them (SeedXMLLM); the frozen ViT
stays sharded (1.9B params: replicated it would cost each GPU more memory than its share of the 13B LLM)
and every rank makes as many ViT calls per step as the rank with the most view chunks (one scalar
all-reduce; the others encode a dummy view), see `src.parallel.same_call_count`.
"""

from __future__ import annotations

import torch

from src.data.batch import FrozenInputs, MLLMBatch
from src.models.mllm import LORA_TARGETS
from src.models.vocab import NUM_SEEDX_TOKENS
from src.parallel import same_call_count
from src.specs.seedx import SeedXConfig, SeedXRecipe
from src.stages.base import LoraConfig, StageConfig, StageModule
from src.utils.constraints import PositiveInt
from src.utils.flops import mllm_step_flops


class MLLMPretrainConfig(StageConfig):
    lora: LoraConfig | None = None
    full_finetune: bool = False
    vit_chunk_size: PositiveInt = 16
    init_seed: int = 0
    # lora vs full_finetune is cross-checked once, by the spec (SeedXConfig.from_args), when the stage is built


class MLLMPretrainModule(SeedXRecipe, StageModule):
    """The losses and step of SEED-X pre-training; its models are the spec's (src/specs/seedx.py)."""

    config_model = MLLMPretrainConfig

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
        self.configure(SeedXConfig.from_args(model, lora, full_finetune, vit_chunk_size, init_seed))

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

    # ---- loss ---------------------------------------------------------------------------------------
    def frozen_inputs(self) -> FrozenInputs:
        return FrozenInputs(self._vit_on_pixels, dtype=lambda: next(self.vit.parameters()).dtype)

    @torch.no_grad()
    def image_embeds(self, batch: MLLMBatch) -> torch.Tensor:
        """(N, T, D) ViT outputs of the batch's views: stored (data.features_dir) or encoded now."""
        return self.frozen_inputs().vit(batch)

    @torch.no_grad()
    def _vit_on_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
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

    def compute_losses(self, batch: MLLMBatch, split: str) -> dict[str, torch.Tensor]:
        out = self.mllm(
            input_ids=batch.input_ids,
            labels=batch.labels,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            ids_cmp_mask=batch.ids_cmp_mask,
            ids_gen_mask=batch.ids_gen_mask,
            image_embeds=self.image_embeds(batch),
            embeds_cmp_mask=batch.embeds_cmp_mask,
            embeds_gen_mask=batch.embeds_gen_mask,
            patch_positions=batch.patch_positions,
        )
        return {"loss": out["loss"], "loss_ce": out["loss_ce"], "loss_mse": out["loss_mse"]}

    # ---- throughput ---------------------------------------------------------------------------------
    def flops_per_batch(self, batch: MLLMBatch):
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
    def generate_text(self, batch: MLLMBatch, max_new_tokens: int = 32) -> list[int]:
        """Greedy continuation of one prompt sample (batch of 1).

        Full forward passes through `self.mllm` (no KV cache): slower than `generate`, but it goes through
        the root module's forward, so it works when FSDP2 has sharded the model (probes are short).
        """
        ids = batch.input_ids
        cmp_mask, gen_mask = batch.ids_cmp_mask, batch.ids_gen_mask
        feats = self.image_embeds(batch)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.mllm(
                input_ids=ids, ids_cmp_mask=cmp_mask, ids_gen_mask=gen_mask, image_embeds=feats,
                embeds_cmp_mask=batch.embeds_cmp_mask, embeds_gen_mask=batch.embeds_gen_mask,
                patch_positions=batch.patch_positions,
            )["logits"]
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            pad = torch.zeros(1, 1, dtype=torch.bool, device=ids.device)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            cmp_mask, gen_mask = torch.cat([cmp_mask, pad], 1), torch.cat([gen_mask, pad], 1)
        return new
