"""What every stage shares: optimiser + schedule, param groups, logging, lean checkpoints.

A stage is its family's model recipe (src/specs: how the towers are built, filled, frozen and sharded) plus
`compute_losses(batch)`, which turns a batch into a dict of losses (key "loss" is the one optimised):
`class Stage(FamilyRecipe, StageModule)`. Nothing else is stage-specific.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from src.data.batch import Batch, batch_meta
from src.data.position import loader_generator, planned_steps
from src.parallel import FSDP2Strategy, block_classes, parallelize, writes_sharded_checkpoints
from src.utils.checkpoint_kind import FAMILY_KEY, STAGE_KEY
from src.utils.constraints import ConfigModel, Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from src.utils.materialize import materialize
from src.utils.weights import check_paths

log = logging.getLogger(__name__)

VAL_NOISE_SEED = 1234
NO_DECAY_HINTS = ("bias", "norm", "ln_", "embed", "latents", "query", "pos")


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings and learned queries/positions (1-D or table params)."""
    decay, no_decay = [], []
    for name, p in named:
        lname = name.lower()
        if p.ndim < 2 or any(h in lname for h in NO_DECAY_HINTS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class SchedulerConfig(ConfigModel):
    """`stage.scheduler` (the arguments of build_lr_scheduler)."""

    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: Fraction = 0.0


class LoraConfig(ConfigModel):
    """`stage.lora` of the LLM stages (src/models/mllm.py apply_lora)."""

    enabled: bool = False
    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: Fraction = 0.0
    targets: list[str] | None = None


class StageConfig(ConfigModel):
    """The `stage` node every stage takes (validated before a run by src/utils/config.py); a stage with more
    arguments subclasses it and names it as its `config_model`. `model` is the `model/*` nodes, checked on
    their own; `optimizer` is a nested `_target_` node, checked against its own class."""

    model: dict
    optimizer: Any = None
    scheduler: SchedulerConfig | None = None
    checkpoint_frozen: bool = False
    nonfinite_loss: Literal["skip", "stop"] = "skip"


class PretrainedStartConfig(StageConfig):
    """What an SFT start (src/specs/pretrained_start.py) adds to its stage's node (an SFT config subclasses it and the stage's own config)."""

    init_from: str | None = None
    pretrain_lora: Literal["merge", "keep"] = "merge"


def build_lr_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
        )
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ValueError(f"stage.scheduler.name must be 'cosine' or 'constant', got {name!r}")


class StageModule(L.LightningModule):
    # The typed `stage` node this class takes (src/utils/config.py validates it before anything is built).
    config_model: ClassVar[type[StageConfig]] = StageConfig

    def __init__(
        self,
        model: dict,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict | None = None,
        checkpoint_frozen: bool = False,
        nonfinite_loss: str = "skip",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0})
        self.checkpoint_frozen = checkpoint_frozen
        self.nonfinite_loss = nonfinite_loss
        self.nonfinite_steps = 0
        self._last_good_batch: dict | None = None
        self._every_rank_has_good_batch = False
        self._built = False
        # Samples / tokens trained on, all ranks (this rank's count x world size): alternative x-axes of every
        # curve (progress/*), kept in the checkpoint so a resume continues them.
        self.progress = {"samples_seen": 0, "tokens_seen": 0}
        self._micro = (-1, 0)  # (step, micro-batch index) of the last training draw (step_generator)

    # ---- what a stage implements (the build, paths and towers: its recipe, src/specs/base.py) ----------
    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Called by Lightning before fit/restore (under the strategy's init context, e.g. FSDP).
        if self._built:
            return
        check_paths(self.required_paths())  # every missing path at once, before anything is built
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and self.builds_empty:
            # torchtitan's order: meta build -> shard -> allocate and read only this rank's shards.
            self.build_empty(load_weights=True)
            self.shard(strategy.fsdp2, self.device_mesh)
            materialize(self, self.weight_sources(load_weights=True), strategy.root_device, type(self).__name__)
        else:
            self.build_models(load_weights=True)
            if isinstance(strategy, FSDP2Strategy):
                self.shard(strategy.fsdp2, self.device_mesh)
        self._built = True

    def shard(self, opts, mesh) -> None:
        """FSDP2 (with AC / compile per block) on every child, as `strategy.fsdp2` says."""
        blocks = block_classes(list(self.fsdp_blocks))
        for name, child in self.named_children():
            child_opts = replace(opts, param_dtype=None) if name in self.fsdp_keep_dtype else opts
            parallelize(child, blocks, mesh, child_opts, forward_methods=self.fsdp_forward_methods.get(name, ()))

    def batch_size_of(self, batch: Batch) -> int:
        return batch_meta(batch).batch_size

    # ---- throughput (src/callbacks/throughput.py) ---------------------------------------------------
    def tokens_of(self, batch: dict) -> int | None:
        """Non-pad tokens of a batch (None when the stage has no token stream)."""
        n = batch.get("num_tokens") if isinstance(batch, (dict, Batch)) else None
        return None if n is None else int(n)

    def flops_per_batch(self, batch: dict) -> float | torch.Tensor | None:
        """Analytic model FLOPs of one training step on `batch` (src/utils/flops.py); None: not modelled.

        May return a 0-dim tensor on the batch's device so that no host sync is needed every step.
        """
        return None

    def training_step(self, batch: dict, batch_idx: int):
        # Every rank must take the same branch, or DDP/FSDP collectives hang: a rank whose batch was all
        # bad replays its last good batch at zero weight, and a non-finite loss anywhere skips the step
        # everywhere (no backward, so no optimizer update).
        empty = self.batch_size_of(batch) == 0
        if not self._every_rank_has_good_batch:
            # Until every rank holds a good batch to replay, a rank whose first batches are all bad has nothing
            # to run: then every rank skips the step alike (one boolean all-reduce per step until then).
            if self._any_rank(empty and self._last_good_batch is None):
                return None
            self._every_rank_has_good_batch = True
        losses = self.compute_losses(self._last_good_batch if empty else batch, "train")
        if empty:
            return losses["loss"] * 0.0
        self._last_good_batch = batch
        world = self.trainer.world_size if self._trainer is not None else 1
        self.progress["samples_seen"] += self.batch_size_of(batch) * world
        self.progress["tokens_seen"] += (self.tokens_of(batch) or 0) * world
        nonfinite = not bool(torch.isfinite(losses["loss"].detach()))
        if self._any_rank(nonfinite):
            self._on_nonfinite(batch, losses, local=nonfinite)
            return None
        self._log_losses(losses, "train", self.batch_size_of(batch))
        return losses["loss"]

    # ---- randomness of a step (noise, drop masks, negatives) -------------------------------------------
    def step_generator(self, split: str) -> torch.Generator:
        """Every draw of one compute_losses call: per (stage.noise_seed, rank, step, micro-batch) in training,
        so ranks draw differently and a resume continues each stream without saved RNG state; one fixed
        generator otherwise, so validation losses compare across steps."""
        if split != "train":
            return torch.Generator().manual_seed(VAL_NOISE_SEED)
        step = int(self.global_step)
        last, micro = self._micro
        # Gradient accumulation runs several batches at one global_step: each gets its own stream.
        micro = micro + 1 if step == last else 0
        self._micro = (step, micro)
        return loader_generator(getattr(self, "noise_seed", 0), self.global_rank, step, micro)

    def _any_rank(self, flag: bool) -> bool:
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _on_nonfinite(self, batch: dict, losses: dict, local: bool) -> None:
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, reduce_fx="max", batch_size=1)
        report = {
            "step": int(self.global_step),
            "rank": int(self.global_rank),
            "loss": {k: float(v.detach()) for k, v in losses.items()},
            "this_rank_nonfinite": local,
            "sources": sorted(set(batch_meta(batch).sources)),
            "ids": list(batch_meta(batch).ids),
        }
        log.warning("non-finite loss at step %d: %s", report["step"], json.dumps(report))
        if self._trainer is not None:
            path = Path(self.trainer.default_root_dir) / "nonfinite_steps.jsonl"
            with path.open("a") as f:
                f.write(json.dumps(report) + "\n")
        if self.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"non-finite loss at step {report['step']} (stage.nonfinite_loss=stop): {json.dumps(report)}"
            )

    def validation_step(self, batch: dict, batch_idx: int):
        if self.batch_size_of(batch) == 0:
            # Sharded models all-gather in forward: run the same forward as the other ranks, log nothing.
            if self._last_good_batch is not None and self._trainer is not None and self.trainer.world_size > 1:
                self.compute_losses(self._last_good_batch, "val")
            return None
        losses = self.compute_losses(batch, "val")
        self._log_losses(losses, "val", self.batch_size_of(batch))
        return losses["loss"]

    def _log_losses(self, losses: dict[str, torch.Tensor], split: str, batch_size: int) -> None:
        # One log_dict call per step: each self.log call costs ~1 ms of Python on the hot path.
        values = {f"{split}/{name}": value.detach().float() for name, value in losses.items()}
        if split == "train":
            if self._trainer is not None and self.trainer.optimizers:
                values["train/lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            values.update({f"progress/{k}": float(v) for k, v in self.progress.items() if v})
            self.log_dict(values, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        else:
            self.log_dict(values, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(param_groups(self.trainable_named_parameters(), wd))
        total = planned_steps(self.trainer) if self.trainer else 1
        sched = build_lr_scheduler(
            optimizer,
            self.scheduler_cfg.get("name", "cosine"),
            int(self.scheduler_cfg.get("warmup_steps", 0)),
            max(total, 1),
            float(self.scheduler_cfg.get("min_lr_ratio", 0.0)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- lean checkpoints -----------------------------------------------------------------------------
    # Frozen towers (ViT, VAE, most of the UNet) come back from their weight paths on resume, so a
    # checkpoint holds only what trains (plus buffers). A 2.6B-param SDXL would otherwise be rewritten
    # at every save. `checkpoint_frozen: true` keeps everything.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["progress"] = dict(self.progress)
        # The family and the stage in it by name: a checkpoint of the wrong kind is refused, and inference
        # builds the right model without guessing (src/utils/checkpoint_kind.py, src/specs).
        checkpoint[FAMILY_KEY] = self.spec.name
        checkpoint[STAGE_KEY] = self.stage_name
        # Sharded (distributed) checkpoints load against the full module state as a template, and each
        # rank writes only its shard anyway: keep everything there.
        if self.checkpoint_frozen or writes_sharded_checkpoints(self._trainer.strategy if self._trainer else None):
            return
        frozen = self.frozen_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["frozen_keys_dropped"] = len(frozen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.progress.update(checkpoint.get("progress") or {})
        # Missing trainable / unexpected keys named; frozen entries filled so Lightning's strict load passes.
        self.check_checkpoint(checkpoint)
