"""The SEED tokenizer's specs. Its checkpoints name two families (src/utils/checkpoint_kind.py):

* `seed_qformer` (stage 1): a causal Q-Former (+ BLIP-2 heads, `blip2`) over the frozen EVA-CLIP ViT-g;
* `seed_tokenizer` (stage 2, v1 and v2): frozen ViT and causal Q-Former (from the stage-1 checkpoint,
  `stage.init_from`: its `blip2.qformer.*` tensors, the text feed-forward branch dropped as released; or a
  tokenizer checkpoint), the trained codec (codebook, decoder branches) and, for training only, the frozen
  target encoder of `model.seed_decoder`.

`SeedTokenizerModel` is the plain model inference builds (`codes_of`); src/stages/seed_qformer.py and
seed_tokenizer.py add the losses.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from src.data.mllm import load_tokenizer
from src.data.seed_tokenizer import DEC_TOKEN, add_dec_token
from src.models.causal_qformer import CausalQFormer, CausalQFormerConfig
from src.models.eva_vit import EvaViTConfig, build_eva_vit, encode
from src.models.qformer_pretrain import QFormerPretrainConfig, QFormerPretrainer
from src.models.seed_codec import SeedCodec, SeedCodecConfig
from src.models.seed_decoder import SeedDecoderConfig, build_target_encoder
from src.models.seed_qformer_weights import load_qformer_weights
from src.specs.base import ModelSpec, Recipe, SpecModel
from src.utils.checkpoint import checkpoint_tensors, read_checkpoint
from src.utils.constraints import ConfigValueError
from src.utils.materialize import seeded
from src.utils.weights import RequiredPath, check_keys_and_shapes

log = logging.getLogger(__name__)

EVA_BLOCK = "timm.models.eva.EvaBlock"
QFORMER_LAYER = "transformers.models.blip_2.modeling_blip_2.Blip2QFormerLayer"
STAGE1_PREFIX = "blip2.qformer."  # where a seed_tokenizer_qformer checkpoint keeps the Q-Former
# where a tokenizer checkpoint (ours or converted) keeps them
TOKENIZER_PREFIXES = ("qformer.", "codec.")
# stage 1's text feed-forward branch: the stage-2 Q-Former has none (the released one deleted it)
TEXT_FFN = re.compile(r"\.encoder\.layer\.\d+\.(intermediate|output)\.")


def _check_vit_width(encoder_hidden_size: int, vit: EvaViTConfig) -> None:
    if encoder_hidden_size != vit.width:
        raise ConfigValueError("model.qformer.qformer.encoder_hidden_size",
                               f"model.qformer.qformer.encoder_hidden_size={encoder_hidden_size} must "
                         f"equal model.eva_vit.width={vit.width}")


# ---- stage 1: the causal Q-Former -----------------------------------------------------------------------
@dataclass
class SeedQFormerConfig:
    """The typed model config of SEED tokenizer stage 1: `model.{eva_vit,qformer}`."""

    vit: EvaViTConfig
    qformer: QFormerPretrainConfig
    init_seed: int = 0

    @classmethod
    def from_args(cls, model: dict, init_seed: int = 0) -> SeedQFormerConfig:
        cfg = cls(EvaViTConfig(**model["eva_vit"]), QFormerPretrainConfig(**model["qformer"]), init_seed)
        _check_vit_width(cfg.qformer.qformer_cfg.encoder_hidden_size, cfg.vit)
        return cfg


class SeedQFormerRecipe(Recipe):
    stage_name = "stage1"

    def configure(self, cfg: SeedQFormerConfig) -> None:
        self.vit_cfg, self.qf_cfg = cfg.vit, cfg.qformer
        self.tokenizer_path = self.qf_cfg.tokenizer
        self.init_seed = cfg.init_seed
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

    def report_modules(self) -> dict:
        b = self.blip2
        return {"vit": self.vit, "blip2.qformer": b.qformer, "blip2.text_embeddings": b.text_embeddings,
                "blip2.heads": torch.nn.ModuleList([b.vision_proj, b.text_proj, *([b.itm_head] if hasattr(b, "itm_head") else []),
                                                    *([b.lm_head.predictions.transform] if hasattr(b, "lm_head") else [])])}


class SeedQFormerModel(SeedQFormerRecipe, SpecModel):
    def __init__(self, model: dict, init_seed: int = 0) -> None:
        nn.Module.__init__(self)
        self.configure(SeedQFormerConfig.from_args(model, init_seed))


SEED_QFORMER = ModelSpec(
    name="seed_qformer",
    config_classes={"eva_vit": EvaViTConfig, "qformer": QFormerPretrainConfig},
    stages={"stage1": SeedQFormerModel},
    frozen=("vit",),
    fsdp_blocks=(EVA_BLOCK, QFORMER_LAYER),
)
SeedQFormerRecipe.spec = SEED_QFORMER


# ---- stage 2: the tokenizer ----------------------------------------------------------------------------
@dataclass
class SeedTokenizerConfig:
    """The typed model config of SEED tokenizer stage 2: `model.{eva_vit,qformer,seed_codec,seed_decoder}`
    and the stage's model arguments."""

    vit: EvaViTConfig
    qformer: CausalQFormerConfig  # stage 1's Q-Former without the text input
    allow_random_qformer: bool
    codec: SeedCodecConfig
    decoder: SeedDecoderConfig
    init_from: str | None = None
    init_seed: int = 0
    weights_in_checkpoint: bool = False

    @classmethod
    def from_args(cls, model: dict, init_from: str | None = None, init_seed: int = 0,
                  weights_in_checkpoint: bool = False) -> SeedTokenizerConfig:
        qf = QFormerPretrainConfig(**model["qformer"])
        cfg = cls(EvaViTConfig(**model["eva_vit"]), dataclasses.replace(qf.qformer_cfg, text_input=False),
                  qf.allow_random_init, SeedCodecConfig(**model["seed_codec"]),
                  SeedDecoderConfig(**model["seed_decoder"]), init_from, init_seed, bool(weights_in_checkpoint))
        cfg.codec.check(cfg.qformer.hidden_size, cfg.decoder.num_tokens)
        _check_vit_width(cfg.qformer.encoder_hidden_size, cfg.vit)
        size = cfg.decoder.encoder_image_size  # the target encoder sees the ViT's view
        if size is not None and size != cfg.vit.image_size:
            raise ConfigValueError("model.seed_decoder.image_encoder.image_size",
                                   f"model.seed_decoder.image_encoder.image_size={size} must equal "
                             f"model.eva_vit.image_size={cfg.vit.image_size} (both encode the same view)")
        return cfg


class SeedTokenizerRecipe(Recipe):
    stage_name = "stage2"
    init_from_family = "seed_qformer"  # what stage.init_from must be (checked before any build)

    def configure(self, cfg: SeedTokenizerConfig) -> None:
        self.vit_cfg, self.qf_cfg, self.codec_cfg, self.decoder_cfg = cfg.vit, cfg.qformer, cfg.codec, cfg.decoder
        self.allow_random_qformer = cfg.allow_random_qformer
        self.init_from = cfg.init_from
        self.init_seed = cfg.init_seed
        self.weights_in_checkpoint = cfg.weights_in_checkpoint

    def required_paths(self) -> list[RequiredPath]:
        own = [] if self.weights_in_checkpoint else [
            *self.vit_cfg.required_paths(),
            RequiredPath("stage.init_from", "a seed_tokenizer_qformer checkpoint (.ckpt or sharded dir)",
                         self.init_from, "file", required=not self.allow_random_qformer)]
        return [*own, *self.decoder_cfg.required_paths()]

    def build_models(self, load_weights: bool = True) -> None:
        from_files = load_weights and not self.weights_in_checkpoint
        self.vit = build_eva_vit(self.vit_cfg, from_files, self.init_seed)
        with seeded(self.init_seed, "qformer"):
            self.qformer = CausalQFormer(self.qf_cfg)
        with seeded(self.init_seed, "seed_codec"):
            self.codec = SeedCodec(self.codec_cfg, self.qf_cfg.hidden_size, self.qf_cfg.num_queries,
                                   self.decoder_cfg.num_tokens, self.decoder_cfg.embed_dim)
        if from_files and self.init_from:
            self.load_stage1(self.init_from)
        self.target = build_target_encoder(self.decoder_cfg, load_weights, self.init_seed)
        self.freeze_towers()

    def training_only_modules(self) -> dict:
        """What only training needs (src.inspect reports the tokenizer without it): the target encoder."""
        return {"target": self.target}

    def load_stage1(self, path: str) -> None:
        """The causal Q-Former (with ln_vision and query tokens) of a seed_tokenizer_qformer checkpoint (its
        text FFN dropped), or the Q-Former and codec of a tokenizer checkpoint holding its frozen tensors (a
        converted release, or ours with checkpoint_frozen): training continues from its codebook and decoder."""
        checkpoint = read_checkpoint(path, "stage.init_from")
        tensors = checkpoint_tensors(path, checkpoint, "stage.init_from")
        if any(k.startswith(STAGE1_PREFIX) for k in tensors):
            parts = {"qformer": {k.removeprefix(STAGE1_PREFIX): v for k, v in tensors.items()
                                 if k.startswith(STAGE1_PREFIX) and not TEXT_FFN.search(k)}}
            what = "a seed_tokenizer_qformer"
        else:
            parts = {p[:-1]: {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)}
                     for p in TOKENIZER_PREFIXES}
            what = "a seed_tokenizer (or converted)"
        for name, state in parts.items():
            module = getattr(self, name)
            own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            check_keys_and_shapes(own, {k: tuple(v.shape) for k, v in state.items()},
                                  f"stage.init_from ({path}) is not {what} checkpoint of this model.{name}:",
                                  "checkpoint")
            module.load_state_dict(state)
            log.info("stage.init_from=%s: %s loaded (%d tensors)", path, name, len(state))

    def check_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if self.weights_in_checkpoint and state is not None:
            # nothing else filled the frozen towers: every tokenizer tensor must be there (the target
            # encoder comes from model.seed_decoder)
            missing = sorted(k for k in self.state_dict() if k not in state and not k.startswith("target."))
            if missing:
                raise RuntimeError(f"checkpoint (weights_in_checkpoint) lacks {len(missing)} tokenizer tensors: "
                                   + ", ".join(missing))
        super().check_checkpoint(checkpoint)

    @torch.no_grad()
    def causal_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, 224, 224) -> the frozen causal Q-Former's 32 embeddings (B, 32, 768)."""
        return self.qformer(encode(self.vit, pixels))

    @torch.no_grad()
    def codes_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> the image's discrete codes (B, 32): what data_prep writes for SEED-LLaMA."""
        return self.codec.codes_of(self.causal_embeddings(pixels))

    def report_modules(self) -> dict:
        return {"vit": self.vit, "qformer": self.qformer, "codec": self.codec, "target": self.target}


class SeedTokenizerModel(SeedTokenizerRecipe, SpecModel):
    """The SEED tokenizer for inference (`codes_of`, `codec`, `decoder_cfg`), state dict keys as the stage's."""

    def __init__(self, model: dict, init_from: str | None = None, init_seed: int = 0,
                 weights_in_checkpoint: bool = False) -> None:
        nn.Module.__init__(self)
        self.configure(SeedTokenizerConfig.from_args(model, init_from, init_seed, weights_in_checkpoint))


SEED_TOKENIZER = ModelSpec(
    name="seed_tokenizer",
    config_classes={"eva_vit": EvaViTConfig, "qformer": QFormerPretrainConfig, "seed_codec": SeedCodecConfig,
                    "seed_decoder": SeedDecoderConfig},
    stages={"stage2": SeedTokenizerModel},
    frozen=("vit", "qformer", "target"),
    fsdp_blocks=(EVA_BLOCK, QFORMER_LAYER),
)
SeedTokenizerRecipe.spec = SEED_TOKENIZER
