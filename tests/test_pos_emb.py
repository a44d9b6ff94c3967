"""2-D position term ([x, y, 1-x, 1-y] / 2) @ P for image views."""

import pytest
import torch

from src.data.any_res import tile_positions
from src.models.pos_emb import init_patch_pos_embed, patch_pos_term

pytestmark = pytest.mark.unit


def _table(width=8):
    return torch.randn(4, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_global_view_gets_mean_of_rows():
    table = _table()
    out = patch_pos_term(torch.tensor([[0.5, 0.5]]), table)
    torch.testing.assert_close(out[0], table.mean(0))


def test_quarter_position_exact_weights():
    table = _table()
    out = patch_pos_term(torch.tensor([[0.25, 0.25]]), table)
    expected = 0.125 * table[0] + 0.125 * table[1] + 0.375 * table[2] + 0.375 * table[3]
    torch.testing.assert_close(out[0], expected)


def test_matches_official_formula_for_a_2x2_grid():
    table = _table(16)
    pos = torch.tensor(tile_positions(2, 2), dtype=torch.float64)
    official = torch.mm(torch.cat([pos, 1 - pos], dim=-1) / 2, table)  # seed_x.py L68
    out = patch_pos_term(pos, table)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, official)
    torch.testing.assert_close(out[-1], table.mean(0))


def test_positions_follow_table_dtype_and_gradients_reach_the_table():
    table = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.bfloat16))
    out = patch_pos_term(torch.tensor([[0.25, 0.75]], dtype=torch.float32), table)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert table.grad is not None


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="positions"):
        patch_pos_term(torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="table"):
        patch_pos_term(torch.zeros(3, 2), torch.zeros(3, 2))


def test_init_is_scaled_normal():
    torch.manual_seed(0)
    p = init_patch_pos_embed(4096)
    assert isinstance(p, torch.nn.Parameter) and p.shape == (4, 4096) and p.requires_grad
    assert abs(p.std().item() - 4096**-0.5) < 0.05 * 4096**-0.5
    with torch.device("meta"):
        assert init_patch_pos_embed(5120).is_meta
    with pytest.raises(ValueError, match="width"):
        init_patch_pos_embed(0)
