"""SEED-X 2-D position term for image views (tiles and the global view).

Each view's 64 resampled tokens get the same vector ``([x, y, 1-x, 1-y] / 2) @ P``, where (x, y) is the
view's centre in [0, 1] and ``P`` is a learnable [4, width] table. The official wrapper keeps ``P`` as a
top-level parameter named ``patch_pos_embed`` (checkpoint key ``patch_pos_embed``, shape [4, 5120]), so
this module only supplies the function and the initial value; the wrapper owns the parameter.
The term is linear in (x, y), so it extrapolates to grids never seen in training; (0.5, 0.5) gives the
mean of the four rows.
"""

from __future__ import annotations

import torch
from torch import nn


def patch_pos_term(positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``positions`` (n, 2) of (x, y) and ``table`` [4, width] -> (n, width) position vectors.

    Add ``.unsqueeze(1)`` to broadcast over a view's tokens. Positions are cast to the table's dtype and
    device, as the official code does before its ``torch.mm``.
    """
    if positions.ndim != 2 or positions.shape[-1] != 2:
        raise ValueError(f"positions: expected shape (n, 2), got {tuple(positions.shape)}")
    if table.ndim != 2 or table.shape[0] != 4:
        raise ValueError(f"table: expected shape (4, width), got {tuple(table.shape)}")
    positions = positions.to(device=table.device, dtype=table.dtype)
    weights = torch.cat([positions, 1 - positions], dim=-1) / 2  # [x, y, 1-x, 1-y] / 2
    return weights @ table


def init_patch_pos_embed(
    width: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Parameter:
    """The [4, width] table as the official code initialises it: ``width**-0.5 * randn``.

    Each row then has unit expected norm, so the term starts small next to the resampler output but not
    zero (a zero table would also learn, but official initial checkpoints were trained from this init).
    """
    if width < 1:
        raise ValueError(f"width: must be a positive embedding size, got {width}")
    return nn.Parameter((width**-0.5) * torch.randn(4, width, device=device, dtype=dtype))
