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

import logging

import torch

from src.models.vq import perplexity, usage_stats
from src.specs.seed_tokenizer import TEXT_FFN, SeedTokenizerConfig, SeedTokenizerRecipe
from src.stages.base import StageConfig, StageModule
from src.utils.constraints import NonNegativeFloat, NonNegativeInt

log = logging.getLogger(__name__)

__all__ = ["TEXT_FFN", "SeedTokenizerModule"]


class SeedTokenizerStageConfig(StageConfig):
    init_from: str | None = None
    vq_weight: NonNegativeFloat = 5.0
    recon_weight: NonNegativeFloat = 2.0
    gen_weight: NonNegativeFloat = 0.5
    usage_window: NonNegativeInt = 1000
    dead_code_reset: bool = False
    init_seed: int = 0
    noise_seed: int = 0
    weights_in_checkpoint: bool = False


class SeedTokenizerModule(SeedTokenizerRecipe, StageModule):
    """The losses and codebook-usage logging of SEED tokenizer stage 2; its models are the spec's
    (src/specs/seed_tokenizer.py)."""

    config_model = SeedTokenizerStageConfig

    def __init__(self, model: dict, optimizer, scheduler: dict | None = None, checkpoint_frozen: bool = False,
                 nonfinite_loss: str = "skip", init_from: str | None = None, vq_weight: float = 5.0,
                 recon_weight: float = 2.0, gen_weight: float = 0.5, usage_window: int = 1000, dead_code_reset: bool = False, init_seed: int = 0,
                 noise_seed: int = 0, weights_in_checkpoint: bool = False) -> None:
        super().__init__(model, optimizer, scheduler, checkpoint_frozen, nonfinite_loss)
        # Parse configs now: a config mistake fails before any model is built.
        self.configure(SeedTokenizerConfig.from_args(model, init_from, init_seed, weights_in_checkpoint))
        self.weights = {"vq": vq_weight, "recon": recon_weight, "gen": gen_weight}
        self.usage_window = usage_window
        self.dead_code_reset = dead_code_reset
        self.noise_seed = int(noise_seed)

    # ---- loss ---------------------------------------------------------------------------------------------
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
