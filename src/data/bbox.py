"""Bounding boxes as SEED-X location tokens.

A box is written as ``<box_start><loc-xc><loc-yc><loc-w><loc-h><box_end>``: centre and size on a
``bins`` x ``bins`` grid (224 in SEED-X), each an int in ``[0, bins - 1]``. The official decoder
(``eval_img2text_seed_x_i.py``, ``visualize_bbox``) maps a value ``q`` back to pixels as ``q / bins * size``,
so we quantise with round-half-up of ``value / size * bins`` (the nearest grid value under that decoder) and
clamp to ``[0, bins - 1]``. The clamp only matters for centres or sizes touching the far edge. Decoded
corners are clipped to the image, and each corner ends up within one grid cell (``size / bins`` px) of
the input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from src.data.special_tokens import BOX_END, BOX_START, LOC_TOKEN, NUM_LOC_TOKENS

DEFAULT_BINS = NUM_LOC_TOKENS  # one <loc-N> token per grid value

# Well-formed span: exactly four loc tokens; whitespace between tokens is tolerated because some
# decoders put spaces around added tokens.
_BOX_PATTERN = re.compile(r"<box_start>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<box_end>")


def _check_size(width: float, height: float, bins: int) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"width/height: image size must be positive, got {width}x{height}")
    if bins < 2:
        raise ValueError(f"bins: need at least 2 grid values, got {bins}")


def _to_bin(value: float, size: float, bins: int) -> int:
    q = math.floor(value / size * bins + 0.5)  # round half up: deterministic, unlike banker's round()
    return min(max(q, 0), bins - 1)


def quantize_box(
    box: Sequence[float], width: float, height: float, bins: int = DEFAULT_BINS
) -> tuple[int, int, int, int]:
    """Pixel ``[x0, y0, x1, y1]`` on a ``width`` x ``height`` image -> grid ``(xc, yc, w, h)``."""
    _check_size(width, height, bins)
    if len(box) != 4:
        raise ValueError(f"box: expected [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box: needs x0 <= x1 and y0 <= y1, got {box!r}")
    # Clip to the image first so out-of-frame annotations still describe the visible part.
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return (
        _to_bin((x0 + x1) / 2, width, bins),
        _to_bin((y0 + y1) / 2, height, bins),
        _to_bin(x1 - x0, width, bins),
        _to_bin(y1 - y0, height, bins),
    )


def dequantize_box(q: Sequence[int], width: float, height: float, bins: int = DEFAULT_BINS) -> list[float]:
    """Grid ``(xc, yc, w, h)`` -> pixel ``[x0, y0, x1, y1]`` (official ``q / bins * size``), clipped to the image."""
    _check_size(width, height, bins)
    if len(q) != 4:
        raise ValueError(f"q: expected (xc, yc, w, h), got {q!r}")
    xc, yc, bw, bh = (v / bins for v in q)
    x0, x1 = (xc - bw / 2) * width, (xc + bw / 2) * width
    y0, y1 = (yc - bh / 2) * height, (yc + bh / 2) * height
    return [
        min(max(x0, 0.0), float(width)),
        min(max(y0, 0.0), float(height)),
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
    ]


def box_to_text(q: Sequence[int], bins: int = DEFAULT_BINS) -> str:
    """``(xc, yc, w, h)`` -> ``<box_start><loc-xc><loc-yc><loc-w><loc-h><box_end>``."""
    if len(q) != 4 or not all(isinstance(v, int) and 0 <= v < bins for v in q):
        raise ValueError(f"q: expected four ints in [0, {bins - 1}], got {q!r}")
    return BOX_START + "".join(LOC_TOKEN.format(v) for v in q) + BOX_END


def parse_boxes(text: str, bins: int = DEFAULT_BINS) -> list[tuple[int, int, int, int]]:
    """Every well-formed box span in ``text``, in order; spans with values outside the grid are skipped."""
    boxes = []
    for match in _BOX_PATTERN.finditer(text):
        values = tuple(int(v) for v in match.groups())
        if all(v < bins for v in values):
            boxes.append(values)
    return boxes
