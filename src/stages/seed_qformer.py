"""SEED tokenizer stage 1: a causal Q-Former over frozen EVA-CLIP ViT-g features, trained on image-caption pairs
as released (ITC on the last causal query; BLIP-2's ITC + ITM + ITG as an option, `src/models/qformer_pretrain.py`).

Trains the Q-Former, its query tokens, `ln_vision` and the BLIP-2 heads; the ViT is frozen. The text side
uses `model.qformer.tokenizer` (bert-base-uncased at full size) with BLIP-2's `[DEC]` added. Its checkpoint
is what `seed_tokenizer_v1` / `seed_tokenizer_v2` start from (`stage.init_from`): they read the
`blip2.qformer.*` tensors.
"""

from __future__ import annotations

import torch

from src.data.mllm import load_tokenizer
from src.data.seed_tokenizer import DEC_TOKEN, add_dec_token
from src.models.eva_vit import EvaViTConfig, build_eva_vit, encode
from src.models.qformer_pretrain import QFormerPretrainConfig, QFormerPretrainer
from src.models.seed_qformer_weights import load_qformer_weights
from src.stages.base import StageConfig, StageModule
from src.utils.constraints import ConfigValueError
from src.utils.materialize import seeded
from src.utils.weights import RequiredPath

EVA_BLOCK = "timm.models.eva.EvaBlock"
QFORMER_LAYER = "transformers.models.blip_2.modeling_blip_2.Blip2QFormerLayer"


class SeedQFormerConfig(StageConfig):
    init_seed: int = 0
    noise_seed: int = 0


class SeedQFormerModule(StageModule):

    config_model = SeedQFormerConfig
    checkpoint_family = "seed_qformer"  # written into its checkpoints (src/utils/checkpoint_kind.py)
    frozen_towers = ("vit",)
    fsdp_blocks = (EVA_BLOCK, QFORMER_LAYER)

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", init_seed: int = 0, noise_seed: int = 0) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.vit_cfg = EvaViTConfig(**model["eva_vit"])
        self.qf_cfg = QFormerPretrainConfig(**model["qformer"])
        self.tokenizer_path = self.qf_cfg.tokenizer
        if self.qf_cfg.qformer_cfg.encoder_hidden_size != self.vit_cfg.width:
            raise ConfigValueError("model.qformer.qformer.encoder_hidden_size", f"model.qformer.qformer.encoder_hidden_size={self.qf_cfg.qformer_cfg.encoder_hidden_size} "
                             f"must equal model.eva_vit.width={self.vit_cfg.width}")
        self.init_seed = init_seed
        self.noise_seed = int(noise_seed)
        self.tokenizer = None

    def required_paths(self) -> list[RequiredPath]:
        return [*self.vit_cfg.required_paths(),
                RequiredPath("model.qformer.tokenizer", "a local text tokenizer folder (bert-base-uncased)",
                             self.tokenizer_path, "dir"),
                RequiredPath("model.qformer.weights", "the Q-Former's start (LAVIS blip2_pretrained.pth or a "
                             "bert-base-uncased state dict)", self.qf_cfg.weights, required=False)]

    def build_models(self, load_weights: bool = True) -> None:
        dec_id = 0
        if load_weights:
            self.tokenizer = load_tokenizer(self.tokenizer_path, "model.qformer.tokenizer", extend=add_dec_token)
            vocab = self.qf_cfg.qformer_cfg.vocab_size
            if len(self.tokenizer) > vocab:
                raise ValueError(f"model.qformer.qformer.vocab_size={vocab} is smaller than the tokenizer "
                                 f"({len(self.tokenizer)} tokens with {DEC_TOKEN})")
            dec_id = self.tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        self.vit = build_eva_vit(self.vit_cfg, load_weights, self.init_seed)
        with seeded(self.init_seed, "qformer"):
            self.blip2 = QFormerPretrainer(self.qf_cfg, dec_id)
        if load_weights and self.qf_cfg.weights:
            load_qformer_weights(self.blip2, self.qf_cfg.weights)
        self.freeze_towers()

    def tokenize(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.qf_cfg.max_text_len,
                             return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(batch["caption"], batch["pixels"].device)
        with torch.no_grad():
            image = encode(self.vit, batch["pixels"])
        return self.blip2(image, ids, mask, self.step_generator(split))

    def report_modules(self) -> dict:
        b = self.blip2
        return {"vit": self.vit, "blip2.qformer": b.qformer, "blip2.text_embeddings": b.text_embeddings,
                "blip2.heads": torch.nn.ModuleList([b.vision_proj, b.text_proj, *([b.itm_head] if hasattr(b, "itm_head") else []),
                                                    *([b.lm_head.predictions.transform] if hasattr(b, "lm_head") else [])])}
