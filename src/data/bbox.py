"""Bounding boxes as SEED-X location tokens.

A box is written as ``<box_start><loc-xc><loc-yc><loc-w><loc-h><box_end>``: centre and size on a
``bins`` x ``bins`` grid (224 in SEED-X), each an int in ``[0, bins - 1]``. The official decoder
(``eval_img2text_seed_x_i.py``, ``visualize_bbox``) maps a value ``q`` back to pixels as ``q / bins * size``,
so we quantise with round-half-up of ``value / size * bins`` (the nearest grid value under that decoder) and
clamp to ``[0, bins - 1]``. The clamp only matters for centres or sizes touching the far edge. Decoded
corners are clipped to the image, and each corner ends up within one grid cell (``size / bins`` px) of
the input.

Record boxes are in the stored pixel frame of their image (what converters and detectors reading raw
pixels produce); images are decoded upright (EXIF orientation applied, ``load_image``), so
:func:`orient_box` moves a box into the upright frame with the same orientation before quantising.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from src.data.records import BadSample
from src.models.vocab import BOX_END, BOX_START, LOC_TOKEN, NUM_LOC_TOKENS

DEFAULT_BINS = NUM_LOC_TOKENS  # one <loc-N> token per grid value

# Well-formed span: exactly four loc tokens; whitespace between tokens is tolerated because some
# decoders put spaces around added tokens.
_BOX_PATTERN = re.compile(r"<box_start>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<loc-(\d+)>\s*<box_end>")


def oriented_size(width: float, height: float, orientation: int) -> tuple[float, float]:
    """Size after undoing EXIF ``orientation`` (1-8): width and height swap for 5-8 (a quarter turn or a
    transpose). Its own inverse, so it also gives the stored size from the upright one."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def orient_box(box: Sequence[float], width: float, height: float, orientation: int) -> list[float]:
    """Pixel ``[x0, y0, x1, y1]`` on a stored ``width`` x ``height`` image -> the same region of the image
    turned upright for EXIF ``orientation`` (``PIL.ImageOps.exif_transpose``): 1 none, 2 mirror left-right,
    3 rotate 180, 4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise. Coordinates are pixel edges, so a mirror maps ``x`` to ``width - x``."""
    if orientation not in range(1, 9):
        raise ValueError(f"orientation: EXIF orientation must be 1-8, got {orientation!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = float(width), float(height)

    def point(x: float, y: float) -> tuple[float, float]:
        return {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
                5: (y, x), 6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[orientation]

    (ax, ay), (bx, by) = point(x0, y0), point(x1, y1)
    return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]


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
    if x0 > width or y0 > height or x1 < 0 or y1 < 0 or (x1 > x0 and (x0 >= width or x1 <= 0)) or (
            y1 > y0 and (y0 >= height or y1 <= 0)):
        # Clipped, it would be a zero-size box at an edge, trained as if it marked something there.
        raise BadSample("box_outside_image", f"box {list(box)!r} lies wholly outside the {width:g}x{height:g} image")
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
