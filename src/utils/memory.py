"""Analytic per-GPU memory: of a sharded (FSDP/FSDP2) run, and the model state of a replicated (DDP) one.

An estimate, not a measurement (the terms and their sources are below); `python -m src.inspect` prints it
for the composed config. Terms, in bytes:
  sharded state   (frozen params x frozen bytes + trainable x (4 master + 4 grad + 8 Adam)) / world
  gathered blocks 2 x largest shard unit x compute bytes       (the unit in use + the one prefetched)
  checkpoints     tokens x layers x hidden x 2                  (activation checkpointing keeps block inputs)
  one block       tokens x 34 x hidden                          (Korthikanti et al. 2022, 16-bit, flash attn)
  logits          tokens x vocab x 12                           (fp32 logits, their grad, softmax buffer)
  overhead        2 GiB                                         (CUDA context, allocator fragmentation)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class MemoryEstimate:
    sharded_state: float
    gathered_blocks: float
    checkpoints: float
    one_block: float
    logits: float
    overhead: float = 2 * GIB

    @property
    def total(self) -> float:
        return (self.sharded_state + self.gathered_blocks + self.checkpoints + self.one_block + self.logits
                + self.overhead)

    def as_gib(self) -> dict[str, float]:
        fields = ("sharded_state", "gathered_blocks", "checkpoints", "one_block", "logits", "overhead", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in fields}


def estimate_sharded_memory(
    total_params: int,
    trainable_params: int,
    largest_unit_params: int,
    world_size: int,
    tokens_per_gpu: int,
    layers: int,
    hidden: int,
    vocab: int,
    frozen_bytes: int = 4,
    compute_bytes: int = 2,
    activation_checkpointing: bool = True,
) -> MemoryEstimate:
    frozen = total_params - trainable_params
    state = (frozen * frozen_bytes + trainable_params * 16) / world_size
    ckpt = tokens_per_gpu * layers * hidden * 2 if activation_checkpointing else 0
    block = tokens_per_gpu * 34 * hidden * (1 if activation_checkpointing else layers)
    return MemoryEstimate(
        sharded_state=state,
        gathered_blocks=2 * largest_unit_params * compute_bytes,
        checkpoints=ckpt,
        one_block=block,
        logits=tokens_per_gpu * vocab * 12,
    )


@dataclass
class ReplicatedMemoryEstimate:
    """Model state every GPU of a DDP run holds whole, in bytes, from the parameters' own dtypes:
      frozen weights      frozen numel x their bytes        (bf16 towers: 2, fp32: 4)
      trainable weights   trainable numel x their bytes
      gradients           the same again                     (.grad)
      ddp buckets         the same again                     (DDP's flat all-reduce buffers; gradient_as_bucket_view
                                                            would share them with .grad)
      optimizer           2 x trainable numel x their bytes  (AdamW exp_avg, exp_avg_sq, like the parameter)
    Activations are not modelled here (they depend on resolution, batch and gradient checkpointing).
    """

    frozen_weights: float
    trainable_weights: float
    gradients: float
    ddp_buckets: float
    optimizer: float
    overhead: float = 2 * GIB

    @property
    def total(self) -> float:
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.ddp_buckets + self.optimizer
                + self.overhead)

    def as_gib(self) -> dict[str, float]:
        fields = ("frozen_weights", "trainable_weights", "gradients", "ddp_buckets", "optimizer", "overhead", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in fields}


def estimate_replicated_memory(params: Iterable[torch.nn.Parameter], optimizer_states: int = 2) -> ReplicatedMemoryEstimate:
    """Works on meta-device parameters (only numel and dtype are read)."""
    frozen = trainable = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += nbytes
        else:
            frozen += nbytes
    return ReplicatedMemoryEstimate(frozen_weights=frozen, trainable_weights=trainable, gradients=trainable,
                                    ddp_buckets=trainable, optimizer=optimizer_states * trainable)
