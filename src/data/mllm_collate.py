"""Batch SEED-X MLLM samples (from ``SeedXSequenceBuilder``) into the MLLM batch contract.

Two modes:

* padding (default): one row per sample, right-padded to the longest sample of the batch; ``attention_mask``
  is 1 on real tokens, ``position_ids`` is ``arange(L)`` in every row.
* packing: samples are placed greedily first-fit (in batch order) into rows of at most ``max_length``
  tokens; ``position_ids`` restart at 0 at every sample, ``attention_mask`` is None (the model must keep
  packed samples apart, e.g. from ``position_ids``). The tail of each row (up to the longest row) is
  padding with labels -100 and its own position run starting at 0.

Order invariant (the model scatters image embeddings in row-major order): views are concatenated in the
order their spans appear in the batch, row by row, so the k-th True of ``ids_cmp_mask`` (row-major over
(b, l)) is token ``k % 64`` of the ``k // 64``-th cmp view; the same for gen. ``ids`` / ``sources`` follow
that sample order too (in packing mode it differs from the input order).

A batch is an :class:`~src.data.batch.MLLMBatch`. Skipped samples (``{"skipped": SkippedSample}``) go to
``batch.skipped``; a batch of only bad samples is still a valid batch with ``batch_size`` 0 and empty tensors.

Samples built from precomputed features carry ``vit_features`` and so does their batch (``(N, T, D)``, same
view order); ``feature_shape=(T, D)`` makes a batch without samples ``vit_features`` of shape ``(0, T, D)``
too. A batch never mixes the two.
"""

from __future__ import annotations

from typing import Any

import torch

from src.data.batch import MLLMBatch
from src.data.mllm_sequence import IGNORE_INDEX
from src.data.records import SkippedSample

__all__ = ["MLLMCollator", "pack_first_fit"]

_SEQ_KEYS = ("input_ids", "labels", "ids_cmp_mask", "ids_gen_mask")


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: indices of ``lengths`` per row, each row's total <= ``capacity``, in input order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


class MLLMCollator:
    """``collate_fn`` for the MLLM datamodule; see the module docstring.

    ``vit_image_size`` only sizes ``vit_pixels`` of a batch without any sample (shape (0, 3, S, S));
    ``feature_shape`` (T, D) switches to ``vit_features``.
    """

    def __init__(self, pad_token_id: int, max_length: int, packing: bool = False, vit_image_size: int = 448,
                 feature_shape: tuple[int, int] | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id: needs an id (Llama has no pad token; use unk or eos)")
        if max_length < 1:
            raise ValueError(f"max_length: must be >= 1, got {max_length}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)
        self.packing = bool(packing)
        self.vit_image_size = int(vit_image_size)
        self.feature_shape = tuple(feature_shape) if feature_shape is not None else None

    def __call__(self, samples: list[dict[str, Any]]) -> MLLMBatch:
        skipped: list[SkippedSample] = [s["skipped"] for s in samples if "skipped" in s]
        good: list[dict[str, Any]] = []
        for s in samples:
            if "skipped" in s:
                continue
            n = int(s["input_ids"].numel())
            if n > self.max_length:  # the builder never makes these; never crash a run on it
                skipped.append(SkippedSample("too_long", str(s.get("source", "?")), s.get("id"), "collate",
                                             f"{n} tokens > max_length={self.max_length}"))
                continue
            good.append(s)

        if self.packing:
            rows = pack_first_fit([int(s["input_ids"].numel()) for s in good], self.max_length)
        else:
            rows = [[i] for i in range(len(good))]
        order = [i for row in rows for i in row]
        width = max((sum(int(good[i]["input_ids"].numel()) for i in row) for row in rows), default=0)

        B = len(rows)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, width), dtype=torch.long)
        attention_mask = torch.zeros((B, width), dtype=torch.long)
        ids_cmp_mask = torch.zeros((B, width), dtype=torch.bool)
        ids_gen_mask = torch.zeros((B, width), dtype=torch.bool)
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                s = good[i]
                n = int(s["input_ids"].numel())
                input_ids[b, at:at + n] = s["input_ids"]
                labels[b, at:at + n] = s["labels"]
                ids_cmp_mask[b, at:at + n] = s["ids_cmp_mask"]
                ids_gen_mask[b, at:at + n] = s["ids_gen_mask"]
                attention_mask[b, at:at + n] = 1
                if self.packing:
                    position_ids[b, at:at + n] = torch.arange(n)
                at += n
            if self.packing:
                position_ids[b, at:] = torch.arange(width - at)  # the pad tail is its own run
            else:
                position_ids[b] = torch.arange(width)

        ordered = [good[i] for i in order]
        # Samples from a feature store carry vit_features; probes build from pixels even in a feature run.
        if (ordered and "vit_features" in ordered[0]) or (not ordered and self.feature_shape is not None):
            view_key = "vit_features"
            views = [s[view_key] for s in ordered]
            empty = torch.zeros(0, *(self.feature_shape or ()))
        else:
            view_key = "vit_pixels"
            size = self._view_size(ordered)
            views = [s[view_key] for s in ordered]
            empty = torch.zeros(0, 3, size, size)
        return MLLMBatch(
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            attention_mask=None if self.packing else attention_mask,
            ids_cmp_mask=ids_cmp_mask,
            ids_gen_mask=ids_gen_mask,
            **{view_key: torch.cat(views) if views else empty},
            embeds_cmp_mask=self._cat([s["embeds_cmp_mask"] for s in ordered], torch.bool),
            embeds_gen_mask=self._cat([s["embeds_gen_mask"] for s in ordered], torch.bool),
            patch_positions=(torch.cat([s["patch_positions"] for s in ordered]).reshape(-1, 2).float()
                             if ordered else torch.zeros(0, 2)),
            ids=[s["id"] for s in ordered],
            sources=[s["source"] for s in ordered],
            batch_size=len(ordered),
            num_tokens=int(attention_mask.sum()),
            skipped=skipped,
            truncated=sum(bool(s.get("truncated", False)) for s in ordered),
        )

    def _view_size(self, samples: list[dict[str, Any]]) -> int:
        for s in samples:
            px = s["vit_pixels"]
            if px.dim() == 4:
                return int(px.shape[-1])
        return self.vit_image_size

    @staticmethod
    def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
