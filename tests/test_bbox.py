"""Box quantisation to the 224 grid, <loc-N> text and parsing."""

import random

import pytest

from src.data.bbox import box_to_text, dequantize_box, parse_boxes, quantize_box

pytestmark = pytest.mark.unit


def test_quantize_known_box():
    # 448x224 image, box covering the left half: centre (112, 112) px, size 224x224 px.
    assert quantize_box([0, 0, 224, 224], 448, 224) == (56, 112, 112, 223)  # full height clamps to 223
    assert dequantize_box((56, 112, 112, 224 - 1), 448, 224) == pytest.approx([0.0, 0.5, 224.0, 223.5])


def test_quantize_rounds_half_up_and_clamps():
    assert quantize_box([0, 0, 1, 1], 224, 224) == (1, 1, 1, 1)  # centre 0.5 -> 1, size 1 -> 1
    assert quantize_box([223.6, 0, 224, 224], 224, 224) == (223, 112, 0, 223)
    assert quantize_box([-50, -10, 500, 300], 224, 224) == (112, 112, 223, 223)  # clipped to the image


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_error_is_at_most_one_grid_cell(seed):
    rng = random.Random(seed)
    for _ in range(200):
        w, h = rng.randint(1, 3000), rng.randint(1, 3000)
        xs = sorted(rng.uniform(0, w) for _ in range(2))
        ys = sorted(rng.uniform(0, h) for _ in range(2))
        if rng.random() < 0.2:  # boxes touching the borders exercise the clamp
            xs, ys = [0.0, xs[1]], [ys[0], float(h)]
        box = [xs[0], ys[0], xs[1], ys[1]]
        q = quantize_box(box, w, h)
        assert all(isinstance(v, int) and 0 <= v <= 223 for v in q)
        back = dequantize_box(q, w, h)
        cell_x, cell_y = w / 224, h / 224
        for got, want, cell in zip(back, box, (cell_x, cell_y, cell_x, cell_y)):
            assert abs(got - want) <= cell * (1 + 1e-9)
        assert parse_boxes(box_to_text(q)) == [q]


def test_bad_inputs_raise_value_error_naming_argument():
    with pytest.raises(ValueError, match="box"):
        quantize_box([10, 0, 5, 5], 100, 100)
    with pytest.raises(ValueError, match="width/height"):
        quantize_box([0, 0, 5, 5], 0, 100)
    with pytest.raises(ValueError, match="q"):
        box_to_text((1, 2, 3, 224))
    with pytest.raises(ValueError, match="q"):
        box_to_text((1, 2, 3))


def test_box_to_text_format():
    assert box_to_text((5, 17, 100, 223)) == "<box_start><loc-5><loc-17><loc-100><loc-223><box_end>"


def test_parse_boxes_finds_only_well_formed_spans():
    text = (
        "The dog <box_start><loc-1><loc-2><loc-3><loc-4><box_end> and the cat"
        " <box_start> <loc-10> <loc-20> <loc-30> <loc-40> <box_end>."
        " Broken: <box_start><loc-1><loc-2><loc-3><box_end>"  # three values
        " <box_start><loc-1><loc-2><loc-3><loc-999><box_end>"  # off the grid
        " <box_start><loc-5><loc-6><loc-7><loc-8>"  # never closed
    )
    assert parse_boxes(text) == [(1, 2, 3, 4), (10, 20, 30, 40)]
    assert parse_boxes("no boxes here") == []
