"""src.export as other libraries see it: a fresh Python process that imports nothing of ours loads the tiny
exports with the usual one-liners (AutoModelForCausalLM, AutoPeftModelForCausalLM, DiffusionPipeline) and the
diffusers pipeline, fed our adapter's embeddings, draws the same image as our sampler (src.generate's path); the
saved tokenizer's chat template renders our sequence builder's text; `dtype` sets the stored precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from src.export import export
from src.pipelines.detok import SamplingOptions
from src.specs.inference import build_detokenizer, image_decoder_of
from tests.helpers import trained_tiny_detok_checkpoint, trained_tiny_mllm

pytestmark = pytest.mark.smoke
STEPS, SEED = 3, 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_libraries")
    stage, ckpt = trained_tiny_mllm(tmp)
    detok = {kind: trained_tiny_detok_checkpoint(experiment, tmp_path_factory.mktemp(kind))
             for kind, experiment in (("stage1", "seedx_detok_pretrain_tiny"), ("stage2", "seedx_detok_cond_tiny"))}
    out = export(str(ckpt), tmp / "export", detok_ckpt_path=detok["stage1"], dtype="fp32")
    export(None, tmp / "export_stage2", detok_ckpt_path=detok["stage2"], dtype="fp32")
    return stage, ckpt, out, tmp / "export_stage2", detok


def test_saved_tokenizer_is_clean_and_its_chat_template_renders_our_builder(exported):
    from transformers import AutoConfig, AutoTokenizer

    from src.data.mllm_sequence import SeedXSequenceBuilder

    stage, _, out, _, _ = exported
    saved = json.loads((out / "llm" / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(saved)
    tok = AutoTokenizer.from_pretrained(out / "llm")
    assert tok.pad_token_id is not None
    assert AutoConfig.from_pretrained(out / "llm").pad_token_id == tok.pad_token_id
    chat = [("system", "Be brief."), ("user", "What is in the picture?"), ("assistant", "A cat on a sofa."),
            ("user", "And its colour?"), ("assistant", "Grey.")]
    builder = SeedXSequenceBuilder(stage.tokenizer, chat_format="llama2")

    def ids(rendered):
        return list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)

    for turns in (chat[1:], chat):  # without and with a system turn
        record = {"id": "c/0", "source": "c", "turns": [{"role": r, "content": [{"text": t}]} for r, t in turns]}
        messages = [{"role": r, "content": t} for r, t in turns]
        whole = builder(record)["input_ids"].tolist()
        assert tok.apply_chat_template(messages, tokenize=False) == tok.decode(whole)
        assert ids(tok.apply_chat_template(messages)) == whole  # the ids the model was trained on
        # a generation prompt: the builder's prompt() of the chat without its last answer
        prompt = builder.prompt({**record, "turns": record["turns"][:-1]})["input_ids"].tolist()
        assert ids(tok.apply_chat_template(messages[:-1], add_generation_prompt=True)) == prompt
    # each separately encoded run of turns opens with a word boundary (SentencePiece), as in the builder
    assert tok.apply_chat_template(messages[1:], tokenize=False) == (
        "<s> [INST] What is in the picture? [/INST]\n A cat on a sofa. \n[INST] And its colour? [/INST]\n Grey.</s>")
    # list content (the transformers multimodal form) with text parts renders the same
    listed = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert tok.apply_chat_template(listed, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


FRESH_PROCESS = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from peft import AutoPeftModelForCausalLM
    from diffusers import DiffusionPipeline

    out, stage2, work = sys.argv[1:4]
    want = torch.load(work + "/logits.pt")
    report = {}
    with torch.no_grad():
        llm = AutoModelForCausalLM.from_pretrained(out + "/llm").eval()
        torch.testing.assert_close(llm(input_ids=want["ids"]).logits, want["logits"], atol=1e-5, rtol=0)
        peft = AutoPeftModelForCausalLM.from_pretrained(out + "/lora").eval()
        torch.testing.assert_close(peft(input_ids=want["ids"]).logits, want["logits"], atol=1e-5, rtol=0)
    for kind, folder in (("stage1", out + "/detokenizer"), ("stage2", stage2 + "/detokenizer")):
        pipe = DiffusionPipeline.from_pretrained(folder)
        emb = load_file(work + f"/{kind}_embeds.safetensors")
        neg = load_file(folder + "/adapter/negative.safetensors")
        kw = dict(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                  negative_prompt_embeds=neg["prompt_embeds"], negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"],
                  num_inference_steps=STEPS, guidance_scale=7.5, height=32, width=32,
                  generator=torch.Generator().manual_seed(SEED))
        if kind == "stage2":
            from PIL import Image
            kw.update(image=Image.open(work + "/condition.png"), image_guidance_scale=1.5)
        pipe(**kw).images[0].save(work + f"/{kind}_diffusers.png")
        report[kind] = [type(pipe).__name__, pipe.unet.config.in_channels]
    report["ours_imported"] = sorted(m for m in sys.modules if m == "src" or m.startswith(("src.", "tests")))
    print(json.dumps(report))
''').replace("STEPS", str(STEPS)).replace("SEED", str(SEED))


def test_a_fresh_process_loads_every_export_and_draws_our_images(exported, tmp_path):
    stage, _, out, stage2, detok = exported
    ids = torch.randint(0, len(stage.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": stage.mllm.llm(input_ids=ids).logits}, tmp_path / "logits.pt")
    condition = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    condition.save(tmp_path / "condition.png")
    feats = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(3))
    ours = {}
    for kind, ckpt in detok.items():
        decoder = image_decoder_of(build_detokenizer({}, kind, ckpt))  # what src.generate samples with
        embeds = decoder.prompt_embeds(feats)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in embeds.items()}, str(tmp_path / f"{kind}_embeds.safetensors"))
        ours[kind] = decoder.decode(feats, SamplingOptions(steps=STEPS, sampler="EulerDiscreteScheduler"),
                                    torch.Generator().manual_seed(SEED),
                                    conditions=[condition] if kind == "stage2" else None)[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out), str(stage2), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ours_imported"] == []
    assert report["stage1"] == ["StableDiffusionXLPipeline", 4]
    assert report["stage2"] == ["StableDiffusionXLInstructPix2PixPipeline", 8]
    for kind in detok:
        theirs = Image.open(tmp_path / f"{kind}_diffusers.png")
        assert np.array_equal(np.asarray(theirs), np.asarray(ours[kind])), kind


def test_lora_records_its_base_and_dtype_sets_the_stored_precision(exported, tmp_path):
    _, ckpt, out, _, detok = exported
    base = json.loads((out / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "base").resolve())  # random-init twin: its base is written beside it
    with pytest.raises(ValueError, match="dtype='fp8'"):
        export(str(ckpt), tmp_path / "bad", dtype="fp8")
    bf16 = export(str(ckpt), tmp_path / "bf16", detok_ckpt_path=detok["stage1"], base="/models/Llama-2-13b-chat-hf")
    assert json.loads((bf16 / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "/models/Llama-2-13b-chat-hf"
    assert not (bf16 / "base").exists()
    assert json.loads((bf16 / "llm" / "config.json").read_text())["dtype"] == "bfloat16"
    for part in ("llm/model.safetensors", "agent/model.safetensors", "vit/model.safetensors",
                 "lora/adapter_model.safetensors", "detokenizer/unet/diffusion_pytorch_model.safetensors",
                 "detokenizer/adapter/model.safetensors"):
        full, half = load_file(out / part), load_file(bf16 / part)
        assert full.keys() == half.keys(), part
        for k, v in full.items():  # merged in fp32, then rounded once
            assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)), (part, k)
    vae = load_file(bf16 / "detokenizer/vae/diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in vae.values()} == {torch.float32}  # SDXL's VAE stays fp32
