"""ResamplerXLV2 de-tokenizer adapter: official layout, official math, loading, meta init."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from src.models.detok_adapter import DetokAdapterConfig, ResamplerXLV2

# ---- independent re-statement of the official math (detokenizer/resampler.py) --------------


def ref_ln(x, ln):
    return F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, 1e-5)


def ref_perceiver(x, lat, a, heads, dh):
    x, lat = ref_ln(x, a.norm1), ref_ln(lat, a.norm2)
    q = lat @ a.to_q.weight.T
    k, v = (torch.cat([x, lat], 1) @ a.to_kv.weight.T).chunk(2, -1)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, dh) for t in (q, k, v))
    s = dh**-0.25
    w = torch.einsum("bqhd,bkhd->bhqk", q * s, k * s).float().softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2) @ a.to_out.weight.T


def ref_attnpool(h, p, heads):
    x = h.permute(1, 0, 2)
    x = torch.cat([x.mean(0, keepdim=True), x]) + p.positional_embedding[:, None]
    out, _ = F.multi_head_attention_forward(
        x,
        x,
        x,
        x.shape[-1],
        heads,
        None,
        torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
        None,
        None,
        False,
        0.0,
        p.c_proj.weight,
        p.c_proj.bias,
        training=False,
        need_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=p.q_proj.weight,
        k_proj_weight=p.k_proj.weight,
        v_proj_weight=p.v_proj.weight,
    )
    return out[0]


def ref_forward(x, m):
    cfg = m.cfg
    if cfg.normalize:
        x = F.normalize(x)  # official default dim=1 (tokens)
    x = F.linear(x, m.proj_in.weight, m.proj_in.bias)
    lat = m.latents.repeat(x.shape[0], 1, 1)
    for attn, ff in m.layers:
        lat = ref_perceiver(x, lat, attn, cfg.heads, cfg.dim_head) + lat
        h = F.gelu(ref_ln(lat, ff[0]) @ ff[1].weight.T)
        lat = h @ ff[3].weight.T + lat
    h = ref_ln(lat, m.norm_out)
    prompt = torch.cat(
        [
            F.linear(h, m.unet_proj_1.weight, m.unet_proj_1.bias),
            F.linear(h, m.unet_proj_2.weight, m.unet_proj_2.bias),
        ],
        -1,
    )
    return prompt, ref_attnpool(h, m.unet_attnpool, cfg.heads)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return ResamplerXLV2(DetokAdapterConfig.tiny()).eval()


@pytest.mark.config
def test_full_adapter_matches_official_keys(reference_dir):
    ref = json.loads((reference_dir / "detok_resampler_keys.json").read_text())
    cfg = DetokAdapterConfig()
    assert {k: getattr(cfg, k) for k in ref["config"]} == ref["config"]
    with torch.device("meta"):
        m = ResamplerXLV2(cfg)
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == ref["params"]
    assert sum(p.numel() for p in m.parameters()) == ref["total_params"] == 61_245_696
    assert cfg.prompt_dim == 2048


@pytest.mark.config
def test_config_validation_and_tiny_keeps_flags():
    assert DetokAdapterConfig.tiny().normalize is False and DetokAdapterConfig.tiny().ff_mult == 4
    with pytest.raises(ValueError, match="heads"):
        DetokAdapterConfig(heads=5)
    with pytest.raises(ValueError, match="depth"):
        DetokAdapterConfig(depth=0)


@pytest.mark.unit
def test_tiny_forward_shapes(tiny):
    prompt, pooled = tiny(torch.randn(3, 16, 64))
    assert prompt.shape == (3, 8, 48) and pooled.shape == (3, 32)


@pytest.mark.parity
def test_perceiver_attention_matches_official(tiny):
    a = tiny.layers[0][0]
    x, lat = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lat), ref_perceiver(x, lat, a, 4, 8), atol=1e-5, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("normalize", [False, True])
def test_full_forward_matches_official(normalize):
    torch.manual_seed(0)
    m = ResamplerXLV2(DetokAdapterConfig.tiny(normalize=normalize)).eval()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        for got, want in zip(m(x), ref_forward(x, m)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_official_roundtrip_splits_unet(tmp_path, tiny, suffix):
    sd = {f"resampler.{k}": v.clone() for k, v in tiny.state_dict().items()}
    sd["unet.conv_in.weight"] = torch.ones(4, 8, 3, 3)
    path = tmp_path / f"adapter{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    torch.manual_seed(5)
    other = ResamplerXLV2(DetokAdapterConfig.tiny()).eval()
    unet = other.load_official(path)
    assert list(unet) == ["conv_in.weight"] and torch.equal(unet["conv_in.weight"], torch.ones(4, 8, 3, 3))
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        for a, b in zip(other(x), tiny(x)):
            assert torch.equal(a, b)


@pytest.mark.unit
def test_load_official_names_bad_keys(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    sd["unet_attnpool.positional_embedding"] = torch.zeros(4, 32)
    del sd["layers.1.1.3.weight"]
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="unet_attnpool.positional_embedding") as err:
        tiny.load_official(path)
    assert "layers.1.1.3.weight" in str(err.value)


@pytest.mark.config
def test_meta_build_then_init_weights():
    with torch.device("meta"):
        m = ResamplerXLV2(DetokAdapterConfig.tiny())
    m.to_empty(device="cpu")
    m.init_weights()
    assert all(torch.isfinite(t).all() for t in m.state_dict().values())
    prompt, pooled = m(torch.randn(2, 16, 64))
    assert torch.isfinite(prompt).all() and torch.isfinite(pooled).all()
    assert abs(m.latents.std().item() * 32**0.5 - 1) < 0.35  # 256 samples of N(0, 1/dim)
    assert torch.equal(m.norm_out.weight, torch.ones(32))
