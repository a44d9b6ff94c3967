"""SEED tokenizer stage 2 (v1 and v2): quantise the causal Q-Former's embeddings into 32 discrete codes and
decode them into what a Stable Diffusion decoder takes (`src/models/seed_codec.py`).

Frozen: the EVA ViT, the causal Q-Former (from the stage-1 checkpoint, `stage.init_from`: its
`blip2.qformer.*` tensors, the text feed-forward branch dropped as in the released tokenizer; or a tokenizer
checkpoint: ours or a converted release, whose codec then starts training from its weights) and the target
encoder of `model.seed_decoder`:
* v2 (`seed_decoder: unclip_sd21`): the unCLIP SD 2.1 image encoder (CLIP-H) -> (B, 1, 1024) targets;
* v1 (`seed_decoder: sd14`): the SD v1.4 text encoder on the caption -> (B, 77, 768) targets.
Trained: encode/decode task layers, the codebook, both decoder branches and the head (`src/models/seed_codec.py`).
`weights_in_checkpoint` (set by `data_prep.convert_seed_tokenizer`): every tokenizer tensor, frozen ones
included, comes from the checkpoint being loaded, so no EVA / stage-1 file is read and none may be missing.

loss = vq_weight * VQ + recon_weight * (1 - cos) + gen_weight * MSE (5 / 2 / 0.5 by default).

Codebook usage: the quantiser counts every training batch's codes; every `usage_window` steps the counts of all ranks
are summed and logged (`train/codebook_perplexity`, `train/dead_codes`, `train/used_codes`), dead codes are
optionally moved onto encoder outputs of the last batch (`dead_code_reset`; rank 0 draws, every rank gets
its codebook), and the counts restart. `train/batch_perplexity` is this rank's batch alone, every step.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

from src.models.causal_qformer import CausalQFormer
from src.models.eva_vit import EvaViTConfig, build_eva_vit, encode
from src.models.qformer_pretrain import QFormerPretrainConfig
from src.models.seed_codec import SeedCodec, SeedCodecConfig
from src.models.seed_decoder import SeedDecoderConfig, build_target_encoder
from src.models.vq import perplexity, usage_stats
from src.stages.base import StageConfig, StageModule
from src.stages.seed_qformer import EVA_BLOCK, QFORMER_LAYER
from src.utils.checkpoint import checkpoint_tensors, read_checkpoint
from src.utils.constraints import ConfigValueError, NonNegativeFloat, NonNegativeInt
from src.utils.materialize import seeded
from src.utils.weights import RequiredPath, check_keys_and_shapes

log = logging.getLogger(__name__)

STAGE1_PREFIX = "blip2.qformer."  # where a seed_tokenizer_qformer checkpoint keeps the Q-Former
# where a tokenizer checkpoint (ours or converted) keeps them
TOKENIZER_PREFIXES = ("qformer.", "codec.")
# stage 1's text feed-forward branch: the stage-2 Q-Former has none (the released one deleted it)
TEXT_FFN = re.compile(r"\.encoder\.layer\.\d+\.(intermediate|output)\.")


class SeedTokenizerConfig(StageConfig):
    init_from: str | None = None
    vq_weight: NonNegativeFloat = 5.0
    recon_weight: NonNegativeFloat = 2.0
    gen_weight: NonNegativeFloat = 0.5
    usage_window: NonNegativeInt = 1000
    dead_code_reset: bool = False
    init_seed: int = 0
    noise_seed: int = 0
    weights_in_checkpoint: bool = False


class SeedTokenizerModule(StageModule):

    config_model = SeedTokenizerConfig
    checkpoint_family = "seed_tokenizer"  # written into its checkpoints (src/utils/checkpoint_kind.py)
    init_from_family = "seed_qformer"  # what stage.init_from must be (checked before any build)
    frozen_towers = ("vit", "qformer", "target")
    fsdp_blocks = (EVA_BLOCK, QFORMER_LAYER)

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", init_from: str | None = None, vq_weight: float = 5.0,
                 recon_weight: float = 2.0, gen_weight: float = 0.5, usage_window: int = 1000, dead_code_reset: bool = False, init_seed: int = 0,
                 noise_seed: int = 0, weights_in_checkpoint: bool = False) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        self.vit_cfg = EvaViTConfig(**model["eva_vit"])
        qf = QFormerPretrainConfig(**model["qformer"])
        self.allow_random_qformer = qf.allow_random_init
        self.qf_cfg = dataclasses.replace(qf.qformer_cfg, text_input=False)
        self.codec_cfg = SeedCodecConfig(**model["seed_codec"])
        self.decoder_cfg = SeedDecoderConfig(**model["seed_decoder"])
        self.codec_cfg.check(self.qf_cfg.hidden_size, self.decoder_cfg.num_tokens)
        self.weights_in_checkpoint = bool(weights_in_checkpoint)
        if self.qf_cfg.encoder_hidden_size != self.vit_cfg.width:
            raise ConfigValueError("model.qformer.qformer.encoder_hidden_size", f"model.qformer.qformer.encoder_hidden_size={self.qf_cfg.encoder_hidden_size} must "
                             f"equal model.eva_vit.width={self.vit_cfg.width}")
        size = self.decoder_cfg.encoder_image_size  # the target encoder sees the ViT's view
        if size is not None and size != self.vit_cfg.image_size:
            raise ConfigValueError("model.seed_decoder.image_encoder.image_size", f"model.seed_decoder.image_encoder.image_size={size} must equal "
                             f"model.eva_vit.image_size={self.vit_cfg.image_size} (both encode the same view)")
        self.init_from = init_from
        self.weights = {"vq": vq_weight, "recon": recon_weight, "gen": gen_weight}
        self.usage_window = usage_window
        self.dead_code_reset = dead_code_reset
        self.init_seed = init_seed
        self.noise_seed = int(noise_seed)

    def required_paths(self) -> list[RequiredPath]:
        own = [] if self.weights_in_checkpoint else [
            *self.vit_cfg.required_paths(),
            RequiredPath("stage.init_from", "a seed_tokenizer_qformer checkpoint (.ckpt or sharded dir)",
                         self.init_from, "file", required=not self.allow_random_qformer)]
        return [*own, *self.decoder_cfg.required_paths()]

    # ---- models -----------------------------------------------------------------------------------------
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if self.weights_in_checkpoint and state is not None:
            # nothing else filled the frozen towers: every tokenizer tensor must be there (the target
            # encoder comes from model.seed_decoder)
            missing = sorted(k for k in self.state_dict() if k not in state and not k.startswith("target."))
            if missing:
                raise RuntimeError(f"checkpoint (weights_in_checkpoint) lacks {len(missing)} tokenizer tensors: "
                                   + ", ".join(missing))
        super().on_load_checkpoint(checkpoint)

    # ---- loss ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def causal_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, 224, 224) -> the frozen causal Q-Former's 32 embeddings (B, 32, 768)."""
        return self.qformer(encode(self.vit, pixels))

    @torch.no_grad()
    def codes_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> the image's discrete codes (B, 32): what data_prep writes for SEED-LLaMA."""
        return self.codec.codes_of(self.causal_embeddings(pixels))

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        pixels = batch["pixels"]
        with torch.no_grad():
            target = self.target(pixels=pixels, captions=batch.get("caption"))
        out = self.codec(self.causal_embeddings(pixels), target)
        w = self.weights
        loss = w["vq"] * out["loss_vq"] + w["recon"] * out["loss_recon"] + w["gen"] * out["loss_gen"]
        counts = torch.bincount(out["codes"].reshape(-1), minlength=self.codec_cfg.vq_cfg.num_codes)
        return {"loss": loss, "loss_vq": out["loss_vq"].detach(), "loss_recon": out["loss_recon"].detach(),
                "loss_gen": out["loss_gen"].detach(), "batch_perplexity": perplexity(counts).to(loss.dtype)}

    # ---- codebook usage -----------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = int(self.global_step)
        quantizer = self.codec.quantize  # counts the codes of training batches (train mode) itself
        if not self.usage_window or step % self.usage_window or not bool(quantizer.usage.any()):
            return
        counts = quantizer.usage
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        stats = usage_stats(counts)
        self.log_dict({f"train/codebook_{k}" if k == "perplexity" else f"train/{k}": v for k, v in stats.items()},
                      on_step=True, on_epoch=False, rank_zero_only=True)
        if self.dead_code_reset:
            moved = self.reset_dead_codes(counts)
            self.log("train/codes_reset", float(moved), on_step=True, on_epoch=False, rank_zero_only=True)
        quantizer.reset_usage()

    @torch.no_grad()
    def reset_dead_codes(self, counts: torch.Tensor) -> int:
        import torch.distributed as dist

        weight = self.codec.quantize.embedding.weight
        moved = self.codec.quantize.reset_dead_codes(self.step_generator("train"), counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(weight.data, src=0)  # one codebook on every rank: rank 0's draw
        return moved

    def report_modules(self) -> dict:
        return {"vit": self.vit, "qformer": self.qformer, "codec": self.codec, "target": self.target}
