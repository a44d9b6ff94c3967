"""Any-resolution grid choice, tiling and tile positions (official SEED-X semantics)."""

import pytest
from PIL import Image

from src.data.any_res import (
    DEFAULT_GRIDS,
    grid_resolutions,
    parse_grid,
    select_grid,
    tile_image,
    tile_positions,
)

pytestmark = pytest.mark.unit


def test_parse_grid_is_columns_by_rows():
    assert parse_grid("2x1") == (2, 1)
    assert parse_grid("1x4") == (1, 4)
    # "AxB" pinpoints are A*tile wide and B*tile tall, as in the official grid_pinpoints.
    assert grid_resolutions(["3x1", "1x2"], tile=448) == [(1344, 448), (448, 896)]


@pytest.mark.parametrize("bad", ["2", "0x1", "ax2", "2x2x2", "", "-1x2"])
def test_parse_grid_rejects_bad_strings(bad):
    with pytest.raises(ValueError, match="grid"):
        parse_grid(bad)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1600, 400), (4, 1)),  # wide
        ((400, 1600), (1, 4)),  # tall
        ((1000, 1000), (2, 2)),  # large square
        ((300, 300), (1, 1)),  # small square: nothing gained by upscaling
        ((20, 30), (1, 1)),  # tiny: v1 says 1x1, v2 says 1x2, smaller area wins
        ((1344, 448), (3, 1)),  # exact pinpoint
    ],
)
def test_select_grid_cases(size, expected):
    assert select_grid(*size) == expected


def test_select_grid_matches_hand_computation_where_the_two_scores_disagree():
    # 1000x600 (h/w = 0.6). Official select_best_resolution (effective pixels):
    #   2x2 (896x896): scale = min(0.896, 1.493) = 0.896 -> 896 * int(537.6) = 896*537 = 481152 px (best);
    #   2x1 (896x448): scale = 0.7467 -> 746*448 = 334208; 1x1: 448*268 = 120064.
    # Official select_best_resolution_v2 (aspect ratio first):
    #   2x1 aspect 0.5 -> 0.6/0.5 = 1.2 (best); 1x1 and 2x2 -> 1/0.6 = 1.667; 3x1 -> 0.6/0.333 = 1.8.
    # Smaller area of the two picks: 2x1 (401408 px) < 2x2 (802816 px) -> 2x1.
    assert select_grid(1000, 600) == (2, 1)
    # Offered only 1x1 and 2x2, both scores pick 2x2 (v2 ties on aspect, 2x2 is closer in area).
    assert select_grid(1000, 600, grids=("1x1", "2x2")) == (2, 2)


def test_select_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="width/height"):
        select_grid(0, 10)
    with pytest.raises(ValueError, match="grids"):
        select_grid(10, 10, grids=())


def test_select_grid_stays_within_the_grid_set():
    allowed = {parse_grid(g) for g in DEFAULT_GRIDS}
    for w in (17, 100, 448, 640, 900, 1333, 2000, 4000):
        for h in (13, 120, 448, 480, 899, 1500, 3000):
            assert select_grid(w, h) in allowed


def _quadrant_image(width, height):
    """RGB image whose 2x2 quadrants have distinct flat colours (survive resizing at their centres)."""
    img = Image.new("RGB", (width, height))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for i, colour in enumerate(colours):
        x0, y0 = (i % 2) * width // 2, (i // 2) * height // 2
        img.paste(colour, (x0, y0, x0 + width // 2, y0 + height // 2))
    return img, colours


def test_tile_image_order_sizes_and_global_view_last():
    img, colours = _quadrant_image(1000, 700)
    tiles = tile_image(img, 2, 2, tile=64)
    assert len(tiles) == 5
    assert all(t.size == (64, 64) for t in tiles)
    for tile, colour in zip(tiles[:4], colours):  # row-major: TL, TR, BL, BR
        assert tile.getpixel((32, 32)) == colour
    assert tiles[4].getpixel((16, 16)) == colours[0]  # global view: whole image shrunk
    assert tiles[4].getpixel((48, 48)) == colours[3]


def test_tile_image_stretches_without_keeping_aspect_ratio():
    img = Image.new("RGB", (300, 50), (10, 20, 30))
    tiles = tile_image(img, 3, 1, tile=32)
    assert len(tiles) == 4
    assert all(t.size == (32, 32) for t in tiles)
    assert all(t.getpixel((0, 0)) == (10, 20, 30) for t in tiles)  # no black padding anywhere


def test_tile_image_one_by_one_still_has_a_tile_and_a_global_view():
    tiles = tile_image(Image.new("RGB", (50, 80)), 1, 1, tile=16)
    assert len(tiles) == 2


def test_tile_positions_row_major_then_global():
    assert tile_positions(2, 2) == [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5)]
    assert tile_positions(1, 1) == [(0.5, 0.5), (0.5, 0.5)]
    pos = tile_positions(3, 1)
    assert pos[:3] == [(1 / 6, 0.5), (0.5, 0.5), (5 / 6, 0.5)]
    pos = tile_positions(1, 4)
    assert [p[1] for p in pos[:4]] == [0.125, 0.375, 0.625, 0.875]
    assert len(tile_positions(4, 1)) == 5
    with pytest.raises(ValueError, match="ncols/nrows"):
        tile_positions(0, 1)
