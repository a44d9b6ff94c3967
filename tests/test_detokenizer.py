"""De-tokenizer model pieces: conv_in widening and config checks."""

import pytest
import torch
from omegaconf import OmegaConf

from src.models.detokenizer import DetokenizerConfig, build_unet, widen_conv_in
from tests.helpers import CONF

pytestmark = pytest.mark.unit


def tiny_cfg(**over) -> DetokenizerConfig:
    base = OmegaConf.load(CONF / "model" / "detokenizer" / "sdxl.yaml")
    tiny = OmegaConf.load(CONF / "model" / "detokenizer" / "tiny.yaml")
    tiny.pop("defaults")
    merged = OmegaConf.to_container(OmegaConf.merge(base, tiny, over))
    return DetokenizerConfig(**merged)


def unet_inputs(cfg, b=2, channels=4):
    g = torch.Generator().manual_seed(0)
    s = cfg.latent_size
    return {
        "sample": torch.randn(b, channels, s, s, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(b, 8, cfg.adapter_cfg.prompt_dim, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(b, cfg.adapter_cfg.output2_dim, generator=g),
                           "time_ids": torch.randn(b, 6, generator=g)},
    }


def test_widened_conv_in_keeps_output_and_bias():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    unet = build_unet(cfg, load_weights=False).eval()
    with torch.no_grad():
        unet.conv_in.bias.normal_()  # a non-zero bias must survive widening (diffusers #4960)
    inputs = unet_inputs(cfg)
    with torch.no_grad():
        ref = unet(**inputs).sample
        widen_conv_in(unet, 4)
        extra = torch.randn_like(inputs["sample"])
        out = unet(**{**inputs, "sample": torch.cat([inputs["sample"], extra], 1)}).sample
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    torch.testing.assert_close(out, ref)


def test_widened_unet_config_round_trips(tmp_path):
    cfg = tiny_cfg()
    unet = build_unet(cfg, load_weights=False)
    widen_conv_in(unet, 4)
    unet.save_pretrained(tmp_path)
    from diffusers import UNet2DConditionModel

    again = UNet2DConditionModel.from_pretrained(tmp_path, local_files_only=True)
    assert again.conv_in.weight.shape[1] == 8
    torch.testing.assert_close(again.conv_in.weight, unet.conv_in.weight)


def test_time_embedding_size_is_checked():
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        tiny_cfg(unet={"projection_class_embeddings_input_dim": 81})


def test_resolution_must_fit_vae():
    with pytest.raises(ValueError, match="resolution"):
        tiny_cfg(resolution=33)


def test_diffusers_sources_read_a_bin_with_old_attention_names_as_from_pretrained_does(tmp_path):
    """A VAE saved as a zip `.bin` with the pre-0.15 attention names (query/key/value/proj_attn) fills a meta-built
    VAE to the same values `from_pretrained` gives; a folder without weights names both files it looked for."""
    from diffusers import AutoencoderKL

    from src.models.detokenizer import build_vae, diffusers_weight_sources
    from src.utils.materialize import empty_init, materialize
    from src.utils.weights import MissingWeightsError

    cfg = tiny_cfg()
    torch.manual_seed(0)
    vae = build_vae(cfg, load_weights=False)
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    state = {}
    for key, value in vae.state_dict().items():
        if ".attentions." in key:
            for new, old in old_names.items():
                key = key.replace(new, old)
        state[key] = value
    assert any(".query." in k for k in state)
    (tmp_path / "vae").mkdir()
    vae.save_config(tmp_path / "vae")
    torch.save(state, tmp_path / "vae" / "diffusion_pytorch_model.bin")

    with empty_init():
        empty = build_vae(cfg, load_weights=False)
    materialize(empty, diffusers_weight_sources(empty, str(tmp_path), "vae"), "cpu")
    plain = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", local_files_only=True).state_dict()
    for key, value in empty.state_dict().items():
        assert torch.equal(value, plain[key]) and torch.equal(value, vae.state_dict()[key]), key

    (tmp_path / "unet").mkdir()
    with pytest.raises(MissingWeightsError, match=r"diffusion_pytorch_model.safetensors nor diffusion_pytorch_model.bin"):
        diffusers_weight_sources(empty, str(tmp_path), "unet")
