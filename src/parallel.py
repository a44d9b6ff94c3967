"""Parallelism applied from outside the models (torchtitan order): AC -> per-block compile -> FSDP2.

Stages name their block classes; strategies carry the options. Models know nothing about ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FSDP2Options:
    activation_checkpointing: bool = True
    compile_blocks: bool = False
    param_dtype: str | None = None  # e.g. "bfloat16" on GPU; None keeps the parameters' dtype
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"strategy.{key}={value!r} must be one of {sorted(DTYPES)} or null")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy plus the options the stage's `parallelize` reads.

    Defaults to pure data-parallel sharding over every process (Lightning's own default would put
    tensor parallelism across the GPUs of a node, which our models do not implement).
    """

    def __init__(self, data_parallel_size="auto", tensor_parallel_size=1, fsdp2: dict | None = None, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        if tensor_parallel_size != 1:
            raise ValueError("strategy.tensor_parallel_size: only 1 is supported (no tensor-parallel plan yet)")
        self.fsdp2 = FSDP2Options(**(fsdp2 or {}))

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def block_classes(names: list[str]) -> tuple[type, ...]:
    import importlib

    out = []
    for name in names:
        module, _, cls = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), cls))
    return tuple(out)


def parallelize(root: nn.Module, blocks: tuple[type, ...], mesh, opts: FSDP2Options) -> nn.Module:
    """Shard every instance of `blocks` (after optional AC and compile), then the root."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(opts.param_dtype) if opts.param_dtype else None,
        reduce_dtype=DTYPES.get(opts.reduce_dtype) if opts.reduce_dtype else None,
    )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    targets = [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
               if isinstance(child, blocks)]
    for parent, name, child in targets:
        trains = any(p.requires_grad for p in child.parameters())
        if opts.activation_checkpointing and trains:
            child = checkpoint_wrapper(child)
        if opts.compile_blocks:
            child.compile()  # in place: keeps parameter names (torch.compile() would add `_orig_mod.`)
        fully_shard(child, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=opts.reshard_after_forward)
        setattr(parent, name, child)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=opts.reshard_after_forward)
    return root


# Wrappers that prefix parameter names; state_dict() already strips them, named_parameters() does not.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp_strategy(blocks: list[str], activation_checkpointing: bool = True, **kwargs):
    """Lightning FSDPStrategy with wrap/checkpoint policies given as class paths (yaml-friendly)."""
    from lightning.pytorch.strategies import FSDPStrategy

    classes = set(block_classes(blocks))
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        **kwargs,
    )


def writes_sharded_checkpoints(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return bool(strategy._save_distributed_checkpoint)
    if isinstance(strategy, FSDPStrategy):
        return strategy._state_dict_type == "sharded"
    return False
