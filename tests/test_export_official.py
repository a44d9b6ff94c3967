"""`src.export ... official=true`: the official SEED-X `pretrained/` layout (src/export_official.py) holds the
trained weights under the official names, readable with `torch.load(weights_only=True)`, and the official-format
loaders (the stage-2 one widens a 4-channel UNet first, as SDXLAdapterWithLatentImage does) rebuild the trained
modules from it."""

from __future__ import annotations

import os

import hydra
import pytest
import torch
from safetensors.torch import load_file

from src.export import export
from src.specs.inference import build_detokenizer
from tests.helpers import tiny_run_cfg, trained_tiny_detok_checkpoint, trained_tiny_mllm

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    _, ckpt = trained_tiny_mllm(tmp)
    detok = {kind: trained_tiny_detok_checkpoint(experiment, tmp_path_factory.mktemp(kind))
             for kind, experiment in (("stage1", "seedx_detok_pretrain_tiny"), ("stage2", "seedx_detok_cond_tiny"))}
    out = export(str(ckpt), tmp / "export", detok_ckpt_path=detok["stage1"], dtype="fp32", official=True)
    export(None, out, detok_ckpt_path=detok["stage2"], dtype="fp32", official=True)
    return out, detok


def test_official_layout_holds_the_agent_vit_and_llm(official):
    out, _ = official
    root = out / "official"
    agent = torch.load(root / "seed_x" / "agent" / "pytorch_model.bin", weights_only=True)
    assert {k.split(".")[0] for k in agent} == {"input_resampler", "output_resampler", "patch_pos_embed"}
    for name, ours in (("seed_x/agent/pytorch_model.bin", "agent/model.safetensors"),
                       ("QwenViT/qwen_vit_G.pt", "vit/model.safetensors")):
        got, want = torch.load(root / name, weights_only=True), load_file(out / ours)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    for link in (root / "seed_x" / "llm", root / "cvlm_llama2_tokenizer_100img_and_224loc_addpatch"):
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relative: the export folder can move
        assert link.resolve() == (out / "llm").resolve()


@pytest.mark.parametrize("kind,experiment,folder", [("stage1", "seedx_detok_pretrain_tiny", "first_stage"),
                                                    ("stage2", "seedx_detok_cond_tiny", "second_stage")])
def test_official_detokenizer_checkpoint_rebuilds_the_trained_one(official, kind, experiment, folder, tmp_path):
    out, detok = official
    path = out / "official" / "seed_detokenizer" / folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    assert any(k.startswith("resampler.") for k in state)
    if kind == "stage2":  # the whole UNet (full_ft) with its 8-channel conv_in
        assert state["unet.conv_in.weight"].shape[1] == 8
    else:  # SDXLAdapter: the attention keys / values it trains, nothing else of the UNet
        assert {k.rsplit(".", 2)[-2] for k in state if k.startswith("unet.")} == {"to_k", "to_v"}
    trained = build_detokenizer({}, kind, detok[kind])
    # the official-format path: the 4-channel base built from config (same init seed), widened for stage 2, then
    # the checkpoint loaded over it
    cfg = tiny_run_cfg(experiment, tmp_path, [f"model.detokenizer.adapter_weights={path}"])
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.configure_model()
    again = module.state_dict()
    for k, v in trained.state_dict().items():
        if k.startswith(("resampler.", "unet.")):
            torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)
