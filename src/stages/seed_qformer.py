"""SEED tokenizer stage 1: a causal Q-Former over frozen EVA-CLIP ViT-g features, trained on image-caption pairs
as released (ITC on the last causal query; BLIP-2's ITC + ITM + ITG as an option, `src/models/qformer_pretrain.py`).

Trains the Q-Former, its query tokens, `ln_vision` and the BLIP-2 heads; the ViT is frozen. The text side
uses `model.qformer.tokenizer` (bert-base-uncased at full size) with BLIP-2's `[DEC]` added. Its checkpoint
is what `seed_tokenizer_v1` / `seed_tokenizer_v2` start from (`stage.init_from`): they read the
`blip2.qformer.*` tensors.
"""

from __future__ import annotations

import torch

from src.models.eva_vit import encode
from src.specs.seed_tokenizer import SeedQFormerConfig, SeedQFormerRecipe
from src.stages.base import StageConfig, StageModule


class SeedQFormerStageConfig(StageConfig):
    init_seed: int = 0
    noise_seed: int = 0


class SeedQFormerModule(SeedQFormerRecipe, StageModule):
    """The losses of SEED tokenizer stage 1; its models are the spec's (src/specs/seed_tokenizer.py)."""

    config_model = SeedQFormerStageConfig

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", init_seed: int = 0, noise_seed: int = 0) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.configure(SeedQFormerConfig.from_args(model, init_seed))
        self.noise_seed = int(noise_seed)

    def tokenize(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.qf_cfg.max_text_len,
                             return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(batch["caption"], batch["pixels"].device)
        with torch.no_grad():
            image = encode(self.vit, batch["pixels"])
        return self.blip2(image, ids, mask, self.step_generator(split))
