"""One batch type per family: what the collators return and the stages, callbacks and FLOPs read.

Every family's batch is a dataclass with the same metadata fields (:class:`Batch`: ``ids``, ``sources``,
``batch_size``, ``skipped``), so a callback that reports samples (seen samples, bad samples, the bad-step
guard) reads one set of names. A batch holds its images either as pixels (the frozen towers run on them)
or as stored features (``data.features_dir``: the towers' outputs, read from the feature store); never
both. :class:`~src.data.batch.FrozenInputs` is the one place that tells the two apart: the stages ask it for
the features and it returns the stored ones or runs the tower they hand it.

Lightning moves a batch to the device with ``apply_to_collection``, which rebuilds dataclasses field by
field (tensors moved, other fields kept), so these need no transfer hook. For code not yet converted (and
test helpers that poke at a batch), a batch also reads and writes like the dict it replaces:
``batch["input_ids"]``, ``batch.get("vit_features")``, ``"vit_features" in batch`` (True only for a field
that is set, i.e. not None), ``batch["key"] = value`` for a field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Batch", "DetokBatch", "FrozenInputs", "MLLMBatch", "SeedTokenizerBatch", "batch_meta"]

Tensor = torch.Tensor


@dataclass(kw_only=True)
class Batch:
    """Metadata shared by every family, in sample order (packing reorders samples; these follow)."""

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    batch_size: int = 0
    skipped: list = field(default_factory=list)  # SkippedSample of the samples dropped from this batch

    # ---- dict-style access (transitional: for callers that have not moved to attributes) --------------
    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._names():
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._names() and getattr(self, key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in self._names() else None
        return default if value is None else value

    def keys(self) -> Iterator[str]:
        return (k for k in self._names() if getattr(self, k) is not None)

    def items(self) -> Iterator[tuple[str, Any]]:
        return ((k, getattr(self, k)) for k in self.keys())

    @property
    def stored_features(self) -> bool:
        """The images come as the frozen towers' stored outputs (a feature store), not as pixels."""
        return False

    def head(self, n: int) -> Batch:
        """The first ``n`` samples (families with one tensor row per sample: de-tokenizer, SEED tokenizer)."""
        cut = {f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)
               if isinstance(getattr(self, f.name), (torch.Tensor, list))}
        return dataclasses.replace(self, **cut, batch_size=min(n, self.batch_size))


@dataclass(kw_only=True)
class MLLMBatch(Batch):
    """SEED-X MLLM batch (``src/data/mllm_collate.py`` documents the layout and the view order)."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    attention_mask: Tensor | None  # None when packing (samples are kept apart by position_ids)
    ids_cmp_mask: Tensor
    ids_gen_mask: Tensor
    embeds_cmp_mask: Tensor
    embeds_gen_mask: Tensor
    patch_positions: Tensor
    vit_pixels: Tensor | None = None  # (N, 3, S, S) views, or
    vit_features: Tensor | None = None  # (N, T, D) their stored ViT outputs
    num_tokens: int = 0
    truncated: int = 0

    def __post_init__(self) -> None:
        if (self.vit_pixels is None) == (self.vit_features is None):
            raise ValueError("an MLLM batch holds exactly one of vit_pixels and vit_features")

    @property
    def stored_features(self) -> bool:
        return self.vit_features is not None

    @property
    def n_views(self) -> int:
        return int((self.vit_features if self.stored_features else self.vit_pixels).shape[0])


@dataclass(kw_only=True)
class DetokBatch(Batch):
    """De-tokenizer batch (both stages). Pixels: ``vit_pixels`` (B, 3, S, S), ``vae_pixels`` and
    ``cond_pixels`` (B, 3, R, R) in [-1, 1]; stored features: ``vit_features`` (B, T, D) and the VAE
    posteriors ``vae_moments`` / ``cond_vae_moments`` (B, 2C, h, w). A batch without good samples has only
    the metadata."""

    vit_pixels: Tensor | None = None
    vae_pixels: Tensor | None = None
    cond_pixels: Tensor | None = None
    vit_features: Tensor | None = None
    vae_moments: Tensor | None = None
    cond_vae_moments: Tensor | None = None
    original_size: Tensor | None = None
    crop_top_left: Tensor | None = None
    has_cond: Tensor | None = None

    @property
    def stored_features(self) -> bool:
        return self.vit_features is not None or self.vae_moments is not None


@dataclass(kw_only=True)
class SeedTokenizerBatch(Batch):
    """SEED tokenizer batch: ``pixels`` (B, 3, S, S) and their ``caption`` strings (None: no caption)."""

    pixels: Tensor | None = None
    caption: list[str | None] | None = None


def batch_meta(batch: Any) -> Batch:
    """The shared metadata of any batch a callback sees: a :class:`Batch` itself; a plain dict (a loader
    this repo did not build) by its keys; anything else as an empty batch."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, dict):
        return Batch(ids=list(batch.get("ids") or []), sources=list(batch.get("sources") or []),
                     batch_size=int(batch.get("batch_size", 0)), skipped=list(batch.get("skipped") or []))
    return Batch()


class FrozenInputs:
    """Turns a batch's images into the frozen towers' outputs: the stored ones when the batch carries them,
    else the tower runs on its pixels. ``vit``: pixels (N, 3, S, S) -> (N, T, D); ``vae_posterior``:
    pixels -> a diffusers ``DiagonalGaussianDistribution`` (de-tokenizer stages)."""

    def __init__(self, vit: Callable[[Tensor], Tensor], vae_posterior: Callable[[Tensor], Any] | None = None,
                 dtype: Callable[[], torch.dtype] | None = None) -> None:
        self._vit, self._vae_posterior, self._dtype = vit, vae_posterior, dtype

    def vit(self, batch: Batch) -> Tensor:
        """(N, T, D) ViT outputs of the batch's views, in the ViT's dtype."""
        if batch.vit_features is not None:  # decided per tower: a batch may carry one tower's outputs only
            feats = batch.vit_features
            return feats.to(self._dtype()) if self._dtype is not None else feats
        return self._vit(batch.vit_pixels)

    def posterior(self, batch: DetokBatch, cond: bool = False):
        """The VAE posterior of the target (or, ``cond``, the condition image), stored or encoded now."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = batch.cond_vae_moments if cond else batch.vae_moments
        if moments is not None:
            return DiagonalGaussianDistribution(moments.float())
        if self._vae_posterior is None:
            raise ValueError("this stage has no VAE: FrozenInputs was built without vae_posterior")
        with torch.no_grad():
            return self._vae_posterior(batch.cond_pixels if cond else batch.vae_pixels)
