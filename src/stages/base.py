"""What every stage shares: optimiser + schedule, param groups, logging, lean checkpoints.

A stage subclass builds its models in `build_models(load_weights)` and turns a batch into a dict of
losses in `compute_losses(batch)` (key "loss" is the one optimised). Nothing else is stage-specific.
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

from src.data.position import loader_generator
from src.parallel import FSDP2Strategy, block_classes, parallelize, writes_sharded_checkpoints
from src.utils.checkpoint_kind import FAMILY_KEY
from src.utils.constraints import ConfigModel, Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from src.utils.materialize import TensorSource, clean_name, materialize
from src.utils.weights import RequiredPath, check_paths

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
    checkpoint_family: ClassVar[str | None] = None  # which kind its checkpoints are (checkpoint_kind.py)

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

    # ---- what a stage implements -------------------------------------------------------------------
    # Either `build_empty` + `weight_sources` (builds_empty = True: models on meta, then filled from their
    # sources, shard by shard under FSDP2), or `build_models` directly (built and loaded in full).
    builds_empty: ClassVar[bool] = False

    def build_empty(self, load_weights: bool = True) -> None:
        raise NotImplementedError

    def weight_sources(self, load_weights: bool = True) -> dict[str, TensorSource]:
        raise NotImplementedError

    def build_models(self, load_weights: bool = True) -> None:
        if not self.builds_empty:
            raise NotImplementedError
        self.build_empty(load_weights)
        materialize(self, self.weight_sources(load_weights), "cpu", type(self).__name__)

    def required_paths(self) -> list[RequiredPath]:
        """Every local path `build_models(load_weights=True)` reads, from the model configs; checked all at
        once before a run (src/utils/config.py) and before the build (configure_model)."""
        return []

    def compute_losses(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------
    # Block classes FSDP shards one by one (and checkpoints activations of); stages override.
    fsdp_blocks: tuple[str, ...] = ()
    # Methods other than forward that stages call on a sharded child (e.g. the VAE's encode/decode):
    # FSDP2 must unshard around them as around forward.
    fsdp_forward_methods: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Children FSDP2 gathers in their own dtype whatever strategy.fsdp2.param_dtype is (e.g. the VAE,
    # whose encode must stay fp32).
    fsdp_keep_dtype: tuple[str, ...] = ()
    # Frozen towers: no gradients, and always in eval mode (Lightning's .train() would flip them).
    frozen_towers: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_towers:
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    def freeze_towers(self) -> None:
        for name in self.frozen_towers:
            getattr(self, name).requires_grad_(False).eval()

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

    def batch_size_of(self, batch: dict) -> int:
        return int(batch.get("batch_size", 0))

    # ---- throughput (src/callbacks/throughput.py) ---------------------------------------------------
    def tokens_of(self, batch: dict) -> int | None:
        """Non-pad tokens of a batch (None when the stage has no token stream)."""
        n = batch.get("num_tokens") if isinstance(batch, dict) else None
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
            "sources": sorted(set(batch.get("sources") or batch.get("source") or [])),
            "ids": list(batch.get("ids") or batch.get("id") or []),
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

    def report_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """What `src.inspect` lists one row each for."""
        return dict(self.named_children())

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(param_groups(self.trainable_named_parameters(), wd))
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
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
    def frozen_state_keys(self) -> set[str]:
        return {clean_name(n) for n, p in self.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["progress"] = dict(self.progress)
        if self.checkpoint_family:  # so a checkpoint of the wrong kind is refused by name (checkpoint_kind.py)
            checkpoint[FAMILY_KEY] = self.checkpoint_family
        # Sharded (distributed) checkpoints load against the full module state as a template, and each
        # rank writes only its shard anyway: keep everything there.
        if self.checkpoint_frozen or writes_sharded_checkpoints(self._trainer.strategy if self._trainer else None):
            return
        frozen = self.frozen_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["frozen_keys_dropped"] = len(frozen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.progress.update(checkpoint.get("progress") or {})
        state = checkpoint.get("state_dict")
        if state is None:  # distributed checkpoint: the strategy loads the weights itself
            return
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(k for k in own if k not in state and k not in self.frozen_state_keys())
        if unexpected or missing:
            raise RuntimeError(
                "checkpoint does not match this model's config: "
                f"missing trainable keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        # Fill frozen entries from the freshly built model so Lightning's strict load passes.
        for k, v in own.items():
            state.setdefault(k, v)
