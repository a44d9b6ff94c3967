"""Parallelism applied from outside the models (torchtitan order): AC -> per-block compile -> FSDP2.

Stages name their block classes; strategies carry the options. Models know nothing about ranks.
"""

from __future__ import annotations

import os
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

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Sharded checkpoints are written to `.<name>.tmp/` by every rank, then swapped in whole by rank 0
        (atomic: a reader or a resume never sees a half-written `last.ckpt`). Consolidated ones go through
        the trainer's CheckpointIO (atomic file writes, `src.utils.checkpoint.AtomicCheckpointIO`)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        import shutil
        from pathlib import Path

        from src.utils.checkpoint import fsync_dir, replace_dir

        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and (tmp.exists() or tmp.is_symlink()):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()  # a crashed save
        self.barrier("atomic_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("atomic_save_written")
        if self.global_rank == 0:
            for f in tmp.iterdir():  # the metadata file (torch.save) is not fsynced by torch
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            replace_dir(tmp, path)
        self.barrier("atomic_save_done")


def block_classes(names: list[str]) -> tuple[type, ...]:
    import importlib

    out = []
    for name in names:
        module, _, cls = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), cls))
    return tuple(out)


def parallelize(root: nn.Module, blocks: tuple[type, ...], mesh, opts: FSDP2Options,
                forward_methods: tuple[str, ...] = ()) -> nn.Module:
    """Shard every instance of `blocks` (after optional AC and compile), then the root.

    `forward_methods`: methods of `root` called instead of forward (e.g. a VAE's `encode`, `decode`);
    FSDP2 gathers and frees the root's parameters around them too.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

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
    for method in forward_methods:
        register_fsdp_forward_method(root, method)
    return root


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded `module` or any part of it (its forward calls then run collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def same_call_count(module: nn.Module, n: int, device: torch.device | str = "cpu") -> int:
    """How many forward calls of `module` this rank must make this step when it wants `n`.

    Every forward of an FSDP2-sharded module all-gathers its shards, so all ranks must call it equally
    often or the collectives pair up wrongly (a hang, or silently mixed-up tensors). For a sharded module
    in a multi-process run this is the maximum of `n` over all ranks (one small all-reduce, on `device`:
    a CUDA device under NCCL); the caller makes the missing calls on a dummy input. Otherwise `n`.
    Every rank must reach this call equally often (it is a collective itself).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not is_sharded(module):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())




def fsdp_strategy(blocks: list[str] | None, activation_checkpointing: bool = True, **kwargs):
    """Lightning FSDPStrategy with wrap/checkpoint policies given as class paths (yaml-friendly). `blocks`
    null (conf/strategy/fsdp.yaml): `src.train` passes the stage's model spec's block classes instead."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not blocks:
        raise ValueError("strategy.blocks: no block classes to wrap; src.train fills them from the stage's model "
                         "spec (ModelSpec.fsdp_blocks), or list class paths")
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
