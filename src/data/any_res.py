"""Dynamic-resolution ("any-res") tiling of an image for the SEED-X MLLM.

Semantics follow the official SEED-X preprocessing (``src/data/any_res.py``, ``process_anyres_image``):

* A grid string ``"AxB"`` means A tiles **wide** and B tiles **tall**: its pinpoint resolution is
  ``(A * tile, B * tile)`` as (width, height).
* Two LLaVA-NeXT style scores each pick a grid; the official code keeps whichever pick has the smaller
  area (ties go to the effective-resolution pick).
* The image is resized to the grid *without* keeping its aspect ratio, cut into ``tile`` x ``tile`` crops
  in row-major order, and the whole image resized to ``tile`` x ``tile`` is appended last (global view).
  A 1x1 grid therefore still yields two views: one tile and the global view.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

DEFAULT_GRIDS: tuple[str, ...] = ("1x1", "1x2", "1x3", "2x1", "3x1", "1x4", "4x1", "2x2")
DEFAULT_TILE = 448
GLOBAL_VIEW_POSITION = (0.5, 0.5)


def parse_grid(s: str) -> tuple[int, int]:
    """``"AxB"`` -> ``(ncols, nrows)`` = (A tiles wide, B tiles tall)."""
    parts = str(s).strip().lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"grid: expected 'AxB' with positive integers, got {s!r}")
    ncols, nrows = int(parts[0]), int(parts[1])
    if ncols < 1 or nrows < 1:
        raise ValueError(f"grid: tile counts must be >= 1, got {s!r}")
    return ncols, nrows


def grid_refusal(item: dict, grids: Sequence[str]) -> str | None:
    """Why a comprehension image item's own ``"grid"`` may not be used: it is not one of the experiment's
    allowed ``grids`` (a record's ``"1000x1000"`` would tile a million views before any length check).
    None for ``"any"``, an allowed grid, or a generated image (global view only)."""
    grid = item.get("grid", "any")
    if item.get("generate", False) or grid == "any":
        return None
    if parse_grid(grid) in {parse_grid(g) for g in grids}:
        return None
    return f"grid {grid!r} is not one of the experiment's data.grids {list(grids)}"


def grid_resolutions(grids: Sequence[str] = DEFAULT_GRIDS, tile: int = DEFAULT_TILE) -> list[tuple[int, int]]:
    """Pinpoint (width, height) in pixels for each grid, in the given order (order breaks ties)."""
    if tile < 1:
        raise ValueError(f"tile: must be a positive pixel size, got {tile}")
    if len(grids) == 0:
        raise ValueError("grids: need at least one grid")
    return [(c * tile, r * tile) for c, r in map(parse_grid, grids)]


def _best_by_effective_resolution(
    width: int, height: int, candidates: list[tuple[int, int]]
) -> tuple[int, int]:
    """LLaVA-NeXT ``select_best_resolution``: most image pixels kept after an aspect-preserving fit,
    then least wasted canvas. ``int()`` truncation and strict comparisons match the official code."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def _best_by_aspect_ratio(width: int, height: int, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """Official ``select_best_resolution_v2``: closest aspect ratio (as a >= 1 ratio of ratios), then the
    closest area (also as a >= 1 ratio)."""
    aspect, area = height / width, width * height
    best, best_aspect_diff, best_area_ratio = None, float("inf"), float("inf")
    for cand_w, cand_h in candidates:
        cand_aspect, cand_area = cand_h / cand_w, cand_w * cand_h
        aspect_diff = max(cand_aspect, aspect) / min(cand_aspect, aspect)
        area_ratio = max(cand_area, area) / min(cand_area, area)
        if aspect_diff < best_aspect_diff or (
            aspect_diff == best_aspect_diff and area_ratio < best_area_ratio
        ):
            best, best_aspect_diff, best_area_ratio = (cand_w, cand_h), aspect_diff, area_ratio
    return best


def select_grid(
    width: int, height: int, grids: Sequence[str] = DEFAULT_GRIDS, tile: int = DEFAULT_TILE
) -> tuple[int, int]:
    """Grid ``(ncols, nrows)`` the official code picks for an image of ``width`` x ``height`` pixels."""
    if width < 1 or height < 1:
        raise ValueError(f"width/height: image size must be positive, got {width}x{height}")
    candidates = grid_resolutions(grids, tile)
    w1, h1 = _best_by_effective_resolution(width, height, candidates)
    w2, h2 = _best_by_aspect_ratio(width, height, candidates)
    # Official rule: take the aspect-ratio pick only when it is strictly smaller (fewer tiles).
    best_w, best_h = (w2, h2) if w1 * h1 > w2 * h2 else (w1, h1)
    return best_w // tile, best_h // tile


def tile_image(img: Image.Image, ncols: int, nrows: int, tile: int = DEFAULT_TILE) -> list[Image.Image]:
    """Row-major ``tile`` x ``tile`` crops of ``img`` stretched to the grid, then the global view last.

    Resizing uses PIL's default filter for ``Image.resize`` (bicubic for RGB), as the official code does.
    Returns ``ncols * nrows + 1`` images.
    """
    if ncols < 1 or nrows < 1:
        raise ValueError(f"ncols/nrows: must be >= 1, got {ncols}x{nrows}")
    if tile < 1:
        raise ValueError(f"tile: must be a positive pixel size, got {tile}")
    stretched = img.resize((ncols * tile, nrows * tile))
    tiles = [
        stretched.crop((col * tile, row * tile, (col + 1) * tile, (row + 1) * tile))
        for row in range(nrows)
        for col in range(ncols)
    ]
    tiles.append(img.resize((tile, tile)))
    return tiles


def tile_positions(ncols: int, nrows: int) -> list[tuple[float, float]]:
    """Centre (x, y) in [0, 1] of each tile, row-major, then (0.5, 0.5) for the global view."""
    if ncols < 1 or nrows < 1:
        raise ValueError(f"ncols/nrows: must be >= 1, got {ncols}x{nrows}")
    positions = [((col + 0.5) / ncols, (row + 0.5) / nrows) for row in range(nrows) for col in range(ncols)]
    positions.append(GLOBAL_VIEW_POSITION)
    return positions
