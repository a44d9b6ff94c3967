"""src.export round trips on the tiny twins: merged HF LLM == LoRA model, PEFT adapter on the base == LoRA
model, de-tokenizer folder == trained de-tokenizer, sharded checkpoint dirs read like .ckpt files."""

from __future__ import annotations

import copy

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from src.export import export
from src.pipelines.detok import SamplingOptions
from src.specs.inference import build_detokenizer, build_mllm, image_decoder_of
from tests.helpers import lean_checkpoint, perturb_trainable, tiny_run_cfg, trained_tiny_mllm

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def trained_mllm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mllm")
    stage, ckpt = trained_tiny_mllm(tmp)
    out = export(str(ckpt), tmp / "export", dtype="fp32")
    return stage, ckpt, out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_llm_loads_with_plain_transformers_and_equals_the_lora_model(trained_mllm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage, _, out = trained_mllm
    merged = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "llm", local_files_only=True)
    assert len(tok) == merged.get_input_embeddings().weight.shape[0] == len(stage.tokenizer)
    assert tok.convert_tokens_to_ids("<img>") == stage.tokenizer.convert_tokens_to_ids("<img>")
    ids = torch.randint(0, len(tok), (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, ids), logits(stage.mllm.llm, ids), atol=1e-5, rtol=0)


def test_peft_adapter_on_the_base_equals_the_lora_model(trained_mllm):
    from peft import PeftModel

    stage, ckpt, out = trained_mllm
    fresh = build_mllm(OmegaConf.to_container(OmegaConf.create(torch.load(ckpt, weights_only=False)["hyper_parameters"])))
    base = copy.deepcopy(fresh.mllm.llm).unload()  # the untrained base the adapter applies to
    adapted = PeftModel.from_pretrained(base, str(out / "lora")).eval()
    ids = torch.randint(0, len(stage.tokenizer), (2, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(adapted, ids), logits(stage.mllm.llm, ids), atol=1e-5, rtol=0)
    # our loader takes the same adapter (model.llm.adapter) and refuses one with another rank
    hp = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    hp["model"]["llm"]["adapter"] = str(out / "lora")
    loaded = build_mllm(hp)
    torch.testing.assert_close(logits(loaded.mllm.llm, ids), logits(stage.mllm.llm, ids), atol=1e-5, rtol=0)
    hp["lora"]["r"] = 4
    with pytest.raises(ValueError, match=r"stage.lora.r=4"):
        build_mllm(hp)


def test_exported_agent_and_vit_use_official_key_names(trained_mllm):
    from safetensors.torch import load_file

    stage, _, out = trained_mllm
    agent = load_file(out / "agent" / "model.safetensors")
    assert {k.split(".")[0] for k in agent} == {"input_resampler", "output_resampler", "patch_pos_embed"}
    for k, v in agent.items():
        torch.testing.assert_close(v, stage.mllm.state_dict()[k])
    vit = load_file(out / "vit" / "model.safetensors")
    assert "conv1.weight" in vit and "attn_pool.query" in vit and "proj" in vit


def test_sharded_checkpoint_dir_loads_like_the_ckpt(trained_mllm, tmp_path):
    import torch.distributed.checkpoint as dcp

    stage, ckpt, _ = trained_mllm
    ckpt_dict = torch.load(ckpt, weights_only=False)
    shard_dir = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {k: v.clone() for k, v in stage.state_dict().items()}}, checkpoint_id=str(shard_dir),
             no_dist=True)
    torch.save({"hyper_parameters": ckpt_dict["hyper_parameters"]}, shard_dir / "meta.pt")
    loaded = build_mllm(ckpt_dict["hyper_parameters"], str(shard_dir))
    for k, v in stage.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("experiment,kind", [("seedx_detok_pretrain_tiny", "stage1"), ("seedx_detok_cond_tiny", "stage2")])
def test_detokenizer_export_reloads_to_identical_outputs(experiment, kind, tmp_path):
    from PIL import Image

    cfg = tiny_run_cfg(experiment, tmp_path)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.build_models(load_weights=True)
    perturb_trainable(module, 2)
    ckpt = tmp_path / "detok.ckpt"
    lean_checkpoint(module, ckpt)
    export(None, tmp_path / "export", detok_ckpt_path=str(ckpt), dtype="fp32")

    folder = tmp_path / "export" / "detokenizer"
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["detokenizer"].update(pretrained_dir=str(folder), adapter_weights=str(folder / "adapter" / "model.safetensors"))
    trained = build_detokenizer(model_cfg, kind, str(ckpt))
    reloaded = build_detokenizer(model_cfg, kind)
    assert reloaded.unet.config.in_channels == (8 if kind == "stage2" else 4)
    feats = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(3))
    cond = [Image.new("RGB", (40, 40), (200, 30, 30))] * 2 if kind == "stage2" else None
    outs = []
    for m in (trained, reloaded):
        dec = image_decoder_of(m)
        outs.append([im.tobytes() for im in dec.decode(feats, SamplingOptions(steps=2), torch.Generator().manual_seed(0),
                                                      conditions=cond)])
    assert outs[0] == outs[1]


@pytest.mark.slow  # one `python -m src.export` process (imports torch, transformers, diffusers, peft)
def test_export_command_line_writes_what_export_writes(trained_mllm, tmp_path):
    """`python -m src.export` is a Hydra app with the old key names: run from an empty folder, it writes the
    same files and tensors as export() into `out` only (no Hydra run folder, no .hydra/ beside it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    _, ckpt, expected = trained_mllm
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "E"
    subprocess.run([sys.executable, "-m", "src.export", f"ckpt_path={ckpt}", f"out={out}", "dtype=fp32",
                    "official=false"], cwd=work, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                   capture_output=True)
    assert list(work.iterdir()) == []
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    for part in ("agent/model.safetensors", "vit/model.safetensors"):
        got, want = load_file(out / part), load_file(expected / part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
