"""SEED tokenizer decoders (SD 2.1 unCLIP / SD v1.4) and their frozen target encoders, built offline."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, CLIPTokenizer

from data_prep import make_tiny_clip_tokenizer
from src.models.seed_decoder import (
    SeedDecoderConfig,
    build_target_encoder,
    build_text_encoder,
    build_unet,
    build_vae,
)
from src.pipelines.seed_decode import build_decode_pipeline, decode_embeddings
from src.utils.weights import MissingWeightsError
from tests.conftest import ROOT
from tests.helpers import CONF

pytestmark = pytest.mark.unit

CONF_DIR = CONF / "model" / "seed_decoder"
TINY = {"unclip": "tiny_unclip", "sd": "tiny_sd"}
STEPS = 2


def seed_cfg_dict(name: str, **over) -> dict:
    """The yaml with its `defaults` merged in and `${paths.root_dir}` set to the repo root."""
    own = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    parents = [OmegaConf.load(CONF_DIR / f"{d}.yaml") for d in own.pop("defaults", [])]
    merged = OmegaConf.merge(*parents, own, over, {"paths": {"root_dir": str(ROOT)}})
    out = OmegaConf.to_container(merged, resolve=True)
    out.pop("paths")
    return out


def seed_cfg(name: str, **over) -> SeedDecoderConfig:
    return SeedDecoderConfig(**seed_cfg_dict(name, **over))


def embeds_for(cfg: SeedDecoderConfig, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, cfg.num_tokens, cfg.embed_dim, generator=torch.Generator().manual_seed(seed))


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def clip_pixels(cfg: SeedDecoderConfig) -> torch.Tensor:
    s = cfg.encoder_image_size
    return torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["unclip", "sd"])
def tiny(request):
    cfg = seed_cfg(TINY[request.param])
    return cfg, build_decode_pipeline(cfg)


def test_tiny_twins_decode_deterministically(tiny):
    cfg, pipe = tiny
    assert (cfg.num_tokens, cfg.embed_dim) == ((1, 32) if cfg.kind == "unclip" else (77, 32))
    e = embeds_for(cfg)
    images = decode_embeddings(pipe, cfg.kind, e, steps=STEPS, seed=0)
    assert len(images) == 2 and all(im.size == (cfg.resolution, cfg.resolution) for im in images)
    again = decode_embeddings(pipe, cfg.kind, e, steps=STEPS, seed=0)
    np.testing.assert_array_equal(pixels(images), pixels(again))
    other = decode_embeddings(pipe, cfg.kind, embeds_for(cfg, seed=1), steps=STEPS, seed=0)
    assert not np.array_equal(pixels(images), pixels(other))
    if cfg.kind == "unclip":  # (B, D) and (B, 1, D) are the same request
        flat = decode_embeddings(pipe, cfg.kind, e[:, 0], steps=STEPS, seed=0)
        np.testing.assert_array_equal(pixels(images), pixels(flat))


def test_random_builds_are_seeded_and_leave_global_rng(tiny):
    cfg, pipe = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_decode_pipeline(cfg)
    torch.testing.assert_close(torch.rand(3), expected)
    for name in ("unet", "vae", "text_encoder"):
        for a, b in zip(getattr(pipe, name).state_dict().values(), getattr(again, name).state_dict().values()):
            assert torch.equal(a, b), name


def test_saved_pipeline_loads_back_through_pretrained_dir(tiny, tmp_path):
    cfg, pipe = tiny
    pipe.save_pretrained(tmp_path)
    loaded_cfg = seed_cfg(TINY[cfg.kind], pretrained_dir=str(tmp_path), allow_random_init=False, tokenizer=None)
    loaded = build_decode_pipeline(loaded_cfg)
    assert type(loaded) is type(pipe)
    e = embeds_for(cfg)
    np.testing.assert_array_equal(pixels(decode_embeddings(pipe, cfg.kind, e, steps=STEPS, seed=3)),
                                  pixels(decode_embeddings(loaded, cfg.kind, e, steps=STEPS, seed=3)))
    # The target encoder read from the folder is the one the random build made.
    captions = ["a dog on the beach", ""]
    target = build_target_encoder(loaded_cfg, load_weights=True)
    ref = build_target_encoder(cfg, load_weights=True)
    torch.testing.assert_close(target(pixels=clip_pixels(cfg) if cfg.kind == "unclip" else None, captions=captions),
                               ref(pixels=clip_pixels(cfg) if cfg.kind == "unclip" else None, captions=captions),
                               rtol=0, atol=0)


def test_target_encoder_equals_the_pipeline_encoder(tiny):
    cfg, pipe = tiny
    target = build_target_encoder(cfg, load_weights=True)
    assert not any(p.requires_grad for p in target.parameters())
    target.train()
    assert not target.training and not any(m.training for m in target.modules())
    if cfg.kind == "unclip":
        x = clip_pixels(cfg)
        out = target(pixels=x)
        assert out.shape == (2, 1, cfg.embed_dim)
        with torch.no_grad():
            torch.testing.assert_close(out[:, 0], pipe.image_encoder(pixel_values=x).image_embeds, rtol=0, atol=0)
    else:
        captions = ["a photo of the dog " * 30, "the cat"]  # the first is truncated to 77 tokens
        out = target(captions=captions)
        assert out.shape == (2, 77, cfg.embed_dim)
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(out, pipe.text_encoder(ids)[0], rtol=0, atol=0)


# Measured on the meta device (transformers 5.23 / diffusers 0.42); CLIP ViT-H/14 vision ~632M,
# CLIP ViT-L/14 text ~123M, SD 1.x UNet ~860M (+4.3M unCLIP class-embedding projection in SD 2.1 unCLIP).
FULL_COUNTS = {
    "unclip_sd21": {"target": 632_076_800, "unet": 870_173_124, "vae": 83_653_863, "text": 340_387_840},
    "sd14": {"target": 123_060_480, "unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480},
}


@pytest.mark.config
@pytest.mark.parametrize("name", sorted(FULL_COUNTS))
def test_full_size_builds_on_meta_with_released_sizes(name):
    cfg = seed_cfg(name)
    with torch.device("meta"):
        target = build_target_encoder(cfg, load_weights=False)
        unet, vae, text = build_unet(cfg, False), build_vae(cfg, False), build_text_encoder(cfg, False)
    count = {k: sum(p.numel() for p in m.parameters())
             for k, m in {"target": target, "unet": unet, "vae": vae, "text": text}.items()}
    assert count == FULL_COUNTS[name]
    assert all(p.is_meta for p in target.parameters())
    assert (cfg.num_tokens, cfg.embed_dim) == ((1, 1024) if cfg.kind == "unclip" else (77, 768))


@pytest.mark.parametrize("name", ["unclip_sd21", "sd14"])
def test_missing_pretrained_dir_names_the_key(name, tmp_path):
    for over in ({}, {"pretrained_dir": str(tmp_path / "absent")}):
        cfg = seed_cfg(name, **over)
        with pytest.raises(MissingWeightsError, match=r"model\.seed_decoder\.pretrained_dir"):
            build_target_encoder(cfg, load_weights=True)
        with pytest.raises(MissingWeightsError, match=r"model\.seed_decoder\.pretrained_dir"):
            build_decode_pipeline(cfg)


def test_sd_target_without_tokenizer_says_what_to_set():
    target = build_target_encoder(seed_cfg("tiny_sd", tokenizer=None), load_weights=False)
    with pytest.raises(MissingWeightsError, match=r"model\.seed_decoder\.tokenizer"):
        target(captions=["a dog"])


@pytest.mark.parametrize(
    ("name", "over", "key"),
    [
        ("tiny_sd", {"kind": "dalle"}, "kind"),
        ("tiny_sd", {"unet": {"cross_attention_dim": 48}}, "unet.cross_attention_dim"),
        ("tiny_unclip", {"text_encoder": {"hidden_size": 48}}, "unet.cross_attention_dim"),
        ("tiny_unclip", {"image_encoder": {"projection_dim": 16}}, "unet.projection_class_embeddings_input_dim"),
        ("tiny_unclip", {"unet": {"class_embed_type": None}}, "unet.class_embed_type"),
        ("tiny_sd", {"image_encoder": {"projection_dim": 16}}, "image_encoder"),
        ("tiny_sd", {"resolution": 64}, "unet.sample_size"),
        ("tiny_sd", {"resolution": 36}, "resolution"),
    ],
)
def test_config_errors_name_the_key(name, over, key):
    with pytest.raises(ValueError, match=rf"model\.seed_decoder\.{key}"):
        seed_cfg(name, **over)


def test_tiny_clip_tokenizer_asset_is_current_and_loads(tmp_path):
    make_tiny_clip_tokenizer.write(tmp_path)
    committed = ROOT / "assets" / "tokenizers" / "tiny-clip"
    for path in tmp_path.iterdir():
        assert (committed / path.name).read_bytes() == path.read_bytes(), path.name
    for tok in (CLIPTokenizer.from_pretrained(str(committed), local_files_only=True),
                AutoTokenizer.from_pretrained(str(committed), local_files_only=True)):
        assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.model_max_length == 77
        assert len(tok) == seed_cfg_dict("tiny_sd")["text_encoder"]["vocab_size"]
        ids = tok("The dog")["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == max(json.loads(
            (committed / "vocab.json").read_text()).values())
        assert tok.decode(ids, skip_special_tokens=True) == "the dog"
