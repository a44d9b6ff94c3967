"""A model spec per family: the recipe of the models a stage trains, without the training loop.

torchtitan's ``ModelSpec`` / litgpt's ``Config`` seam. A :class:`ModelSpec` names a family's typed config
classes (one per ``model.<node>``), its towers (frozen ones, FSDP block classes), and its stages: the
plain-``nn.Module`` model class each stage trains (:class:`Recipe` subclasses). A recipe holds the build
(``build_empty`` on meta + ``weight_sources``, or ``build_models`` in full), the required paths and the
frozen towers; it works on whatever ``nn.Module`` it is mixed into, so

* a LightningModule stage (src/stages) is ``class Stage(FamilyRecipe, StageModule)``: the stage adds the
  losses and the step, and its state dict keys are the recipe's;
* inference, export and feature precomputation build the recipe's plain ``nn.Module`` class (``spec.build``),
  with the same state dict keys, so a stage's checkpoint loads into it, and no Lightning is involved.

A checkpoint names its family (``stage_family``) and its stage (``stage_name``), see
src/utils/checkpoint_kind.py; :meth:`ModelSpec.stage_of` reads them (with the legacy guesses for older ones).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from src.utils.checkpoint import read_checkpoint
from src.utils.checkpoint_kind import STAGE_KEY, check_checkpoint_kind
from src.utils.materialize import TensorSource, clean_name, materialize
from src.utils.weights import RequiredPath


@dataclass(frozen=True)
class ModelSpec:
    """One model family. ``stages``: stage name (written into checkpoints) -> its recipe class."""

    name: str  # the family: checkpoint["stage_family"], src/utils/checkpoint_kind.py FAMILIES
    config_classes: dict[str, type]  # model.<node> -> the dataclass that parses it
    stages: dict[str, type[Recipe]]
    frozen: tuple[str, ...] = ()  # towers without gradients, always in eval mode
    fsdp_blocks: tuple[str, ...] = ()  # block classes FSDP shards one by one (and checkpoints activations of)
    # methods other than forward that callers use on a sharded child (FSDP2 unshards around them as well)
    fsdp_forward_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fsdp_keep_dtype: tuple[str, ...] = ()  # children FSDP2 gathers in their own dtype
    # The stage a set of stage arguments configures (an experiment's `stage` node: SFT ones take `init_from`,
    # de-tokenizer stage 2 `cond_drop_rate`); also the legacy path for checkpoints written before
    # `stage_name` was stored (their hyper-parameters are those arguments).
    stage_by_args: Callable[[dict], str] | None = None

    def stage_of(self, checkpoint: dict) -> str:
        """The stage that wrote `checkpoint`: its `stage_name`, or (older checkpoints) the legacy guess."""
        name = checkpoint.get(STAGE_KEY)
        if isinstance(name, str) and name in self.stages:
            return name
        return self.stage_of_args(dict(checkpoint.get("hyper_parameters") or {}))

    def stage_of_args(self, args) -> str:
        """The stage whose constructor arguments `args` are (a `stage` config node or hyper-parameters)."""
        return self.stage_by_args(args) if self.stage_by_args is not None else next(iter(self.stages))

    def build(self, stage: str, args: dict, ckpt_path: str | Path | None = None, checkpoint: dict | None = None,
              key: str = "ckpt_path", load_weights: bool = True) -> Recipe:
        """`stage`'s model, built from a stage's constructor arguments (a resolved `stage` node or a checkpoint's
        hyper-parameters: training-only ones are left out), its weights loaded, filled from `ckpt_path` when
        given (`checkpoint`: it, already read), eval mode, no gradients."""
        cls = self.stages[stage]
        model = cls(**model_args(cls, args))
        if ckpt_path:
            checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, key)
            check_checkpoint_kind(checkpoint, ckpt_path, key, self.name)
        model.build_models(load_weights=load_weights)
        if ckpt_path:
            load_checkpoint_into(model, ckpt_path, key, checkpoint)
        return model.eval().requires_grad_(False)


def model_args(cls: type, args: dict) -> dict:
    """The arguments of `args` that `cls` takes (a stage's other ones, losses and rates, are not the model's)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: copy.deepcopy(v) for k, v in args.items() if k in params and k not in ("self", "_target_")}


class Recipe:
    """How a family's towers are built, filled and frozen; mixed into an ``nn.Module`` (the stage, or the
    family's plain inference model). Subclasses set ``spec`` and implement either ``build_empty`` +
    ``weight_sources`` (``builds_empty = True``: on meta, then filled from the sources, shard by shard under
    FSDP2) or ``build_models`` (built and loaded in full)."""

    spec: ClassVar[ModelSpec]
    stage_name: ClassVar[str]  # this recipe's key in spec.stages, written into checkpoints
    builds_empty: ClassVar[bool] = False

    # ---- what a family implements --------------------------------------------------------------------
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
        once before a run (src/utils/config.py) and before the build."""
        return []

    def report_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """What `src.inspect` lists one row each for."""
        return dict(self.named_children())

    # ---- from the spec ----------------------------------------------------------------------------------
    @property
    def checkpoint_family(self) -> str:
        return self.spec.name

    @property
    def frozen_towers(self) -> tuple[str, ...]:
        return self.spec.frozen

    @property
    def fsdp_blocks(self) -> tuple[str, ...]:
        return self.spec.fsdp_blocks

    @property
    def fsdp_forward_methods(self) -> dict[str, tuple[str, ...]]:
        return self.spec.fsdp_forward_methods

    @property
    def fsdp_keep_dtype(self) -> tuple[str, ...]:
        return self.spec.fsdp_keep_dtype

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_towers:  # frozen towers stay in eval mode (.train() would flip them)
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    def freeze_towers(self) -> None:
        for name in self.frozen_towers:
            getattr(self, name).requires_grad_(False).eval()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def frozen_state_keys(self) -> set[str]:
        """Keys a lean checkpoint leaves out: the frozen weights come back from their weight paths."""
        return {clean_name(n) for n, p in self.named_parameters() if not p.requires_grad}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint's state dict is loaded: a missing trainable key or an unexpected one is named;
        the frozen entries are filled from the built model so a strict load passes."""
        state = checkpoint.get("state_dict")
        if state is None:  # distributed checkpoint: the strategy loads the weights itself
            return
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        frozen = self.frozen_state_keys()
        missing = sorted(k for k in own if k not in state and k not in frozen)
        if unexpected or missing:
            raise RuntimeError(
                "checkpoint does not match this model's config: "
                f"missing trainable keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        for k, v in own.items():
            state.setdefault(k, v)


class SpecModel(nn.Module):
    """Base of a spec's plain inference models (`ModelSpec.stages` values, mixed after their recipe)."""

    @property
    def device(self) -> torch.device:
        """Where its weights are (pipelines move their inputs there), as a LightningModule's `device` says."""
        return next(self.parameters()).device


def _sharded_state(module: nn.Module, path: Path, key: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        dcp.load({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # DCP names the missing entries in its own message
        raise RuntimeError(f"{key}={str(path)!r}: not a sharded checkpoint of this model: {e}") from e
    return state


def load_checkpoint_into(module: Recipe, path: str | Path, key: str = "ckpt_path",
                         checkpoint: dict | None = None) -> dict:
    """Fill a built model (or stage) from a checkpoint (read from `path` unless given), strictly: missing
    trainable and unexpected keys are named. Returns the checkpoint."""
    checkpoint = dict(checkpoint if checkpoint is not None else read_checkpoint(path, key))
    if "state_dict" not in checkpoint:  # sharded directory: the tensors, read into the module's layout
        checkpoint["state_dict"] = _sharded_state(module, Path(path), key)
    try:
        module.check_checkpoint(checkpoint)
    except RuntimeError as e:
        raise RuntimeError(f"{key}={str(path)!r}: {e}") from None
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return checkpoint
