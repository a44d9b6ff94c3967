"""Qwen ViT + Qwen resampler: official layouts, official math, loading, meta init."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from src.models.qwen_vit import QwenViT, QwenViTConfig
from src.models.resampler import (
    QwenResampler,
    ResamplerConfig,
    get_2d_sincos_pos_embed,
    interpolate_pos_embed,
)


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- independent re-statement of the official math (qwen_visual.py) ------------------------


def ref_sincos(embed_dim, grid_size):
    """numpy copy of the official get_2d_sincos_pos_embed."""
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid_size, grid_size)  # w first

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000**omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(
        np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], 1)
    )


def ref_pos(pos, n):
    s, t = math.isqrt(pos.shape[0]), math.isqrt(n)
    if s == t:
        return pos
    p = pos.reshape(1, s, s, -1).permute(0, 3, 1, 2)
    return (
        F.interpolate(p, size=(t, t), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(n, -1)
    )


def ref_ln(x, ln, eps):
    return F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, eps)


def ref_mha(q, k, v, heads, mask=None):
    """(B, L, E) q/k/v already projected; softmax(q k^T / sqrt(hd) + mask) v."""
    b, lq, e = q.shape
    hd = e // heads
    q, k, v = (t.reshape(b, -1, heads, hd) for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(hd), k)
    if mask is not None:
        s = s + mask
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, lq, e)


def ref_visual_attention(x, attn, heads):
    b, n, d = x.shape
    hd = d // heads
    mixed = (torch.einsum("bnd,ed->bne", x, attn.in_proj.weight) + attn.in_proj.bias).view(
        b, n, heads, 3 * hd
    )
    q, k, v = (mixed[..., i * hd : (i + 1) * hd].reshape(b, n, d) for i in range(3))  # per-head [q|k|v]
    return ref_mha(q, k, v, heads) @ attn.out_proj.weight.T + attn.out_proj.bias


def ref_block(x, blk, heads, eps=1e-6):
    x = x + ref_visual_attention(ref_ln(x, blk.ln_1, eps), blk.attn, heads)
    h = ref_ln(x, blk.ln_2, eps) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def ref_resampler(x, m, eps, mask=None):
    pos_k = ref_pos(m.pos_embed, x.shape[1])
    kv = x @ m.kv_proj.weight.T if isinstance(m.kv_proj, torch.nn.Linear) else x
    kv = ref_ln(kv, m.ln_kv, eps)
    q = (ref_ln(m.query, m.ln_q, eps) + m.pos_embed).expand(x.shape[0], -1, -1)
    wq, wk, wv = m.attn.in_proj_weight.chunk(3)  # nn.MultiheadAttention [Q;K;V] blocks
    bq, bk, bv = m.attn.in_proj_bias.chunk(3)
    out = ref_mha(q @ wq.T + bq, (kv + pos_k) @ wk.T + bk, kv @ wv.T + bv, m.cfg.num_heads, mask)
    return out @ m.attn.out_proj.weight.T + m.attn.out_proj.bias


def ref_vit(pixels, m):
    cfg = m.cfg
    x = F.conv2d(pixels, m.conv1.weight, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = ref_ln(x + ref_pos(m.positional_embedding, x.shape[1]), m.ln_pre, 1e-6)
    for blk in m.transformer.resblocks:
        x = ref_block(x, blk, cfg.heads)
    return ref_ln(ref_resampler(x, m.attn_pool, 1e-6), m.ln_post, 1e-6) @ m.proj


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return QwenViT(QwenViTConfig.tiny()).eval()


# ---- (a) full-size layouts -----------------------------------------------------------------


@pytest.mark.config
def test_full_vit_matches_official_keys(reference_dir):
    ref = json.loads((reference_dir / "qwen_vit_keys.json").read_text())
    with torch.device("meta"):
        m = QwenViT(QwenViTConfig())
    assert shapes(m) == ref["params"]
    assert n_params(m) == ref["total_params"] == 1_935_610_624
    assert not m.attn_pool.pos_embed.requires_grad
    assert m.cfg.mlp_width == 8192 and m.attn_pool.cfg.num_heads == 32


@pytest.mark.config
@pytest.mark.parametrize(
    "name, cfg, total",
    [
        ("input_resampler", ResamplerConfig.input_resampler(), 126_525_440),
        ("output_resampler", ResamplerConfig.output_resampler(), 88_637_440),
    ],
)
def test_full_resamplers_match_official_keys(reference_dir, name, cfg, total):
    ref = json.loads((reference_dir / f"{name}_keys.json").read_text())
    assert {k: getattr(cfg, k) for k in ref["config"]} == ref["config"]
    with torch.device("meta"):
        m = QwenResampler(cfg)
    assert shapes(m) == ref["params"]
    assert n_params(m) == ref["total_params"] == total
    agent = json.loads((reference_dir / "seedx_agent_keys.json").read_text())["params"]
    assert {f"{name}.{k}": v for k, v in shapes(m).items()} == {
        k: v for k, v in agent.items() if k.startswith(f"{name}.")
    }


@pytest.mark.config
def test_config_validation_and_tiny_keeps_flags():
    tiny, full = QwenViTConfig.tiny(), QwenViTConfig()
    assert (tiny.ln_eps, tiny.gen_pool_kernel, tiny.mlp_ratio) == (
        full.ln_eps,
        full.gen_pool_kernel,
        full.mlp_ratio,
    )
    with pytest.raises(ValueError, match="heads"):
        QwenViTConfig(heads=5)
    with pytest.raises(ValueError, match="n_queries"):
        QwenViTConfig(n_queries=200)
    with pytest.raises(ValueError, match="patch_size"):
        QwenViTConfig(image_size=450)
    with pytest.raises(ValueError, match="embed_dim"):
        ResamplerConfig(grid_size=2, embed_dim=30, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        ResamplerConfig(grid_size=2, embed_dim=32, num_heads=3)
    assert isinstance(QwenResampler(ResamplerConfig(2, 32, 4, kv_dim=32)).kv_proj, torch.nn.Identity)


# ---- (b) shapes ----------------------------------------------------------------------------


@pytest.mark.unit
def test_tiny_forward_shapes_and_gen_pool(tiny_vit):
    feats = tiny_vit(torch.randn(2, 3, 56, 56))
    assert feats.shape == (2, 16, 64)
    pooled = tiny_vit.pool_for_generation(feats)
    assert pooled.shape == (2, 4, 64)
    # 1x4 strips of consecutive raster tokens, not 2x2 blocks.
    torch.testing.assert_close(pooled, feats.view(2, 4, 4, 64).mean(2))
    r = QwenResampler(ResamplerConfig.tiny())
    assert r(torch.randn(3, 9, 48)).shape == (3, 4, 32)


# ---- (c) numerical parity with the official math -------------------------------------------


@pytest.mark.parity
def test_sincos_matches_official_layout():
    table = get_2d_sincos_pos_embed(16, 4)
    torch.testing.assert_close(table, ref_sincos(16, 4), atol=1e-6, rtol=0)
    grid = table.view(4, 4, 16)  # (row, col, D)
    # First half depends on the column only, second half on the row only.
    assert torch.equal(grid[0, :, :8], grid[3, :, :8]) and torch.equal(grid[:, 0, 8:], grid[:, 3, 8:])
    assert not torch.equal(grid[:, 0, :8], grid[:, 1, :8])


@pytest.mark.parity
def test_interpolate_pos_embed_is_bicubic_fp32():
    pos = torch.randn(64, 8)
    assert interpolate_pos_embed(pos, 64) is pos
    torch.testing.assert_close(interpolate_pos_embed(pos, 256), ref_pos(pos, 256))
    half = interpolate_pos_embed(pos.bfloat16(), 256)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, ref_pos(pos.bfloat16().float(), 256).bfloat16())


@pytest.mark.parity
def test_vit_attention_and_block_match_official(tiny_vit):
    x = torch.randn(2, 16, 32)
    blk = tiny_vit.transformer.resblocks[0]
    with torch.no_grad():
        torch.testing.assert_close(blk.attn(x), ref_visual_attention(x, blk.attn, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(blk(x), ref_block(x, blk, 2), atol=1e-5, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("n_tokens", [4, 16])  # same grid, and 2x2 -> 4x4 key-position interpolation
def test_resampler_matches_official(n_tokens):
    torch.manual_seed(1)
    m = QwenResampler(ResamplerConfig.tiny()).eval()
    with torch.no_grad():
        m.ln_kv.weight.normal_()
        m.ln_q.bias.normal_()
        m.attn.in_proj_bias.normal_()
    x = torch.randn(2, n_tokens, 48)
    mask = torch.zeros(4, n_tokens)
    mask[0, :2] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref_resampler(x, m, 1e-5), atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x, attn_mask=mask), ref_resampler(x, m, 1e-5, mask), atol=1e-5, rtol=0)


@pytest.mark.parity
def test_full_tiny_vit_matches_official(tiny_vit):
    assert tiny_vit.attn_pool.ln_kv.eps == tiny_vit.ln_pre.eps == 1e-6
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(pixels), ref_vit(pixels, tiny_vit), atol=1e-5, rtol=0)


# ---- (d) loading ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "suffix, prefix",
    [(".pt", ""), (".safetensors", ""), (".bin", "transformer.visual."), (".safetensors", "visual.")],
)
def test_load_official_roundtrip(tmp_path, tiny_vit, suffix, prefix):
    sd = {prefix + k: v.clone() for k, v in tiny_vit.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    torch.manual_seed(123)
    other = QwenViT(QwenViTConfig.tiny()).eval()
    other.load_official(path)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(other(pixels), tiny_vit(pixels))
    with torch.device("meta"):  # a meta-built model takes the checkpoint tensors
        meta = QwenViT(QwenViTConfig.tiny(weights=str(path)))
    meta.load_official()
    assert not meta.attn_pool.pos_embed.requires_grad
    with torch.no_grad():
        assert torch.equal(meta.eval()(pixels), tiny_vit(pixels))


@pytest.mark.unit
def test_load_official_names_bad_keys(tmp_path, tiny_vit):
    sd = dict(tiny_vit.state_dict())
    sd["proj"] = torch.zeros(3, 3)
    del sd["attn_pool.query"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="proj") as err:
        tiny_vit.load_official(path)
    assert "attn_pool.query" in str(err.value) and "extra.weight" in str(err.value)


# ---- (e) meta build + init -----------------------------------------------------------------


@pytest.mark.config
def test_meta_build_then_init_weights():
    with torch.device("meta"):
        m = QwenViT(QwenViTConfig.tiny())
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    assert all(torch.isfinite(t).all() for t in m.state_dict().values())
    assert torch.equal(m.attn_pool.pos_embed, get_2d_sincos_pos_embed(64, 4))
    assert not m.attn_pool.pos_embed.requires_grad
    assert torch.isfinite(m(torch.randn(1, 3, 56, 56))).all()
    eager = QwenViT(QwenViTConfig.tiny())
    for name in ("positional_embedding", "proj", "attn_pool.query", "attn_pool.attn.in_proj_weight"):
        a, b = m.get_parameter(name), eager.get_parameter(name)
        assert abs(a.std() / b.std() - 1) < 0.1, name
    assert torch.equal(m.ln_post.weight, torch.ones(64)) and torch.equal(
        m.attn_pool.attn.in_proj_bias, torch.zeros(192)
    )
