"""Official-format checkpoints load into our stages (key names as the released SEED-X files)."""

import hydra
import pytest
import torch

from tests.helpers import tiny_run_cfg

pytestmark = pytest.mark.parity


def build(experiment, tmp_path, overrides=()):
    cfg = tiny_run_cfg(experiment, tmp_path, list(overrides))
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.configure_model()
    return module


def test_stage1_checkpoint_in_official_layout_loads_into_stage1_and_widens_for_stage2(tmp_path):
    torch.manual_seed(0)
    src = build("seedx_detok_pretrain_tiny", tmp_path / "a", ["stage.init_seed=1"])
    with torch.no_grad():  # make the trained parts distinguishable from a fresh init
        for p in src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    official = {k: v for k, v in src.state_dict().items() if k.startswith(("resampler.", "unet."))}
    path = tmp_path / "pytorch_model.bin"
    torch.save(official, path)

    again = build("seedx_detok_pretrain_tiny", tmp_path / "b",
                  ["stage.init_seed=1", f"model.detokenizer.adapter_weights={path}"])
    for k, v in official.items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)

    cond = build("seedx_detok_cond_tiny", tmp_path / "c", ["stage.init_seed=1", f"model.detokenizer.adapter_weights={path}"])
    w = cond.unet.conv_in.weight
    assert w.shape[1] == 8
    torch.testing.assert_close(w[:, :4], official["unet.conv_in.weight"])
    assert torch.count_nonzero(w[:, 4:]) == 0
    torch.testing.assert_close(cond.unet.conv_in.bias, official["unet.conv_in.bias"])


def test_agent_checkpoint_in_official_layout_loads(tmp_path):
    src = build("seedx_pretrain_tiny", tmp_path / "a", ["stage.init_seed=3"])
    agent = {k: v.clone() + 0.5 for k, v in src.mllm.state_dict().items()
             if k.startswith(("input_resampler.", "output_resampler.", "patch_pos_embed"))}
    path = tmp_path / "agent.bin"
    torch.save(agent, path)
    again = build("seedx_pretrain_tiny", tmp_path / "b", [f"model.agent.weights={path}"])
    for k, v in agent.items():
        torch.testing.assert_close(again.mllm.state_dict()[k], v, msg=k)


def test_agent_checkpoint_missing_a_key_is_refused(tmp_path):
    src = build("seedx_pretrain_tiny", tmp_path / "a")
    agent = {k: v for k, v in src.mllm.state_dict().items() if k.startswith("input_resampler.")}
    path = tmp_path / "agent.bin"
    torch.save(agent, path)
    with pytest.raises(ValueError, match="output_resampler"):
        build("seedx_pretrain_tiny", tmp_path / "b", [f"model.agent.weights={path}"])


def renamed(state: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in state.items()}


def test_vit_in_official_layout_loads_and_a_renamed_key_is_named(tmp_path):
    src = build("seedx_pretrain_tiny", tmp_path / "a", ["stage.init_seed=5"])
    vit = {k: v.clone() for k, v in src.vit.state_dict().items()}
    # official Qwen-VL visual names (shared/reference/qwen_vit_keys.json), no `transformer.visual.` prefix
    assert {"conv1.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj.weight", "proj"} <= set(vit)
    path = tmp_path / "qwen_vit.pt"
    torch.save(vit, path)
    again = build("seedx_pretrain_tiny", tmp_path / "b", [f"model.vit.weights={path}"])
    for k, v in vit.items():
        torch.testing.assert_close(again.vit.state_dict()[k], v, msg=k)
    torch.save(renamed(vit, "ln_post.weight", "ln_post.gamma"), path)
    with pytest.raises(Exception, match=r"ln_post\.weight[\s\S]*ln_post\.gamma|ln_post\.gamma[\s\S]*ln_post\.weight"):
        build("seedx_pretrain_tiny", tmp_path / "c", [f"model.vit.weights={path}"])


def test_agent_checkpoint_with_a_renamed_key_names_it(tmp_path):
    src = build("seedx_pretrain_tiny", tmp_path / "a")
    agent = {k: v for k, v in src.mllm.state_dict().items()
             if k.startswith(("input_resampler.", "output_resampler.", "patch_pos_embed"))}
    path = tmp_path / "agent.bin"
    torch.save(renamed(agent, "output_resampler.query", "output_resampler.queries"), path)
    with pytest.raises(ValueError, match=r"output_resampler\.query\b"):
        build("seedx_pretrain_tiny", tmp_path / "b", [f"model.agent.weights={path}"])


def test_stage1_adapter_with_a_renamed_key_names_both_names(tmp_path):
    src = build("seedx_detok_pretrain_tiny", tmp_path / "a")
    official = {k: v for k, v in src.state_dict().items() if k.startswith("resampler.")}
    key = min(official)
    path = tmp_path / "pytorch_model.bin"
    torch.save(renamed(official, key, key + "_renamed"), path)
    with pytest.raises(ValueError, match=rf"missing \(1\): {key}\b[\s\S]*unexpected \(1\): {key}_renamed"):
        build("seedx_detok_pretrain_tiny", tmp_path / "b", [f"model.detokenizer.adapter_weights={path}"])


def test_stage2_checkpoint_in_official_layout_loads_the_whole_unet(tmp_path):
    """SDXLAdapterWithLatentImage (full_ft): `resampler.*` + the whole UNet with an 8-channel conv_in."""
    src = build("seedx_detok_cond_tiny", tmp_path / "a", ["stage.init_seed=2"])
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    official = {k: v for k, v in src.state_dict().items() if k.startswith(("resampler.", "unet."))}
    assert official["unet.conv_in.weight"].shape[1] == 8
    path = tmp_path / "pytorch_model.bin"
    torch.save(official, path)
    again = build("seedx_detok_cond_tiny", tmp_path / "b", [f"model.detokenizer.adapter_weights={path}"])
    for k, v in official.items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)
    torch.save(renamed(official, "unet.conv_in.bias", "unet.conv_in.b"), path)
    with pytest.raises(ValueError, match=r"unet\.conv_in\.b\b"):
        build("seedx_detok_cond_tiny", tmp_path / "c", [f"model.detokenizer.adapter_weights={path}"])


def test_tiny_detokenizer_and_mllm_stages_build_the_same_vit(tmp_path):
    """Same model.vit and init seed -> the same ViT in both stages: the MLLM regresses the features the
    de-tokenizer decodes (with qwen_vit_G.pt both load the file)."""
    detok = build("seedx_detok_pretrain_tiny", tmp_path / "a", ["stage.init_seed=4"])
    mllm = build("seedx_pretrain_tiny", tmp_path / "b", ["stage.init_seed=4"])
    for k, v in mllm.vit.state_dict().items():
        torch.testing.assert_close(detok.vit.state_dict()[k], v, msg=k)
