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
