"""src.generate and src/pipelines on the tiny twins: every mode end to end, reproducibility, forced image
tokens, boxes back to pixels, KV-cached batched decoding against full forward passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.bbox import box_to_text, quantize_box
from src.generate import generate, sequence_builder
from src.models.vocab import NUM_IMG_TOKENS_USED, image_token_ids
from src.pipelines.conversation import MODES, Conversation, ConversationRunner, reply_pieces
from src.pipelines.detok import SamplingOptions
from src.pipelines.mllm import DecodingOptions, Generated, next_tokens
from tests.helpers import FAST_GENERATE, compose_cfg, tiny_generate_cfg

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "sample" / "images"
FAST = FAST_GENERATE
gen_cfg = tiny_generate_cfg  # the shrunk `src.generate` config (the `mllm` fixture: tests/conftest.py)


def prompt(builder, text, images=()):
    content = [{"image": str(IMAGES / i)} for i in images] + [{"text": text}]
    return builder.prompt({"id": text, "source": "t", "turns": [{"role": "user", "content": content}]})


# ---- the decoding loop ------------------------------------------------------------------------------------
def test_forced_image_tokens_follow_img_exactly(mllm):
    cfg, stage, gen = mllm
    ids = image_token_ids(stage.tokenizer)
    builder = sequence_builder(cfg, stage.tokenizer, "t2i")
    span = [ids.img_start, *ids.img[:NUM_IMG_TOKENS_USED], ids.img_end]
    first = gen.generate([prompt(builder, "a red apple")], DecodingOptions(image="first", max_new_tokens=4))[0]
    assert first.token_ids == span and first.finished
    assert len(first.images) == 1 and first.images[0].shape == (64, stage.vit_cfg.output_dim)
    # `required`: the model's own text, then the image where the reply would end
    req = gen.generate([prompt(builder, "a story")], DecodingOptions(image="required", max_new_tokens=3))[0]
    assert req.token_ids[-len(span):] == span and len(req.token_ids) == 3 - 1 + len(span)
    assert ids.img_start not in req.token_ids[:-len(span)] and len(req.images) == 1


def test_batched_kv_cache_decoding_equals_full_forward_greedy(mllm):
    cfg, stage, gen = mllm
    builder = sequence_builder(cfg, stage.tokenizer, "chat")
    samples = [prompt(builder, "What is in the photo?", ["chelsea.jpg"]), prompt(builder, "Hi")]
    assert len(samples[0]["input_ids"]) != len(samples[1]["input_ids"])  # left padding is exercised
    batched = gen.generate(samples, DecodingOptions(max_new_tokens=6))
    # the reference: the training stage's full-forward probe, holding the same weights as the spec's model
    import hydra

    reference = hydra.utils.instantiate(cfg.stage, _convert_="all")
    reference.build_models(load_weights=True)
    reference.load_state_dict(stage.state_dict())
    reference.eval()
    for sample, got in zip(samples, batched):
        ref = reference.generate_text(stage_batch(builder, sample, stage), max_new_tokens=6)
        assert got.token_ids == ref


def stage_batch(builder, sample, stage):
    from src.data.mllm_collate import MLLMCollator

    return MLLMCollator(stage.tokenizer.pad_token_id, 4096, vit_image_size=builder.vit_image_size)([sample])


def test_top_p_keeps_the_nucleus_and_sampling_follows_the_seed():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    opts = DecodingOptions(do_sample=True, top_p=0.05)
    assert {int(next_tokens(logits, opts, torch.Generator().manual_seed(s))) for s in range(20)} == {1}
    opts = DecodingOptions(do_sample=True, temperature=1.0, top_p=1.0)
    draws = [int(next_tokens(logits, opts, torch.Generator().manual_seed(s))) for s in range(40)]
    assert set(draws) >= {1, 3}
    again = [int(next_tokens(logits, opts, torch.Generator().manual_seed(s))) for s in range(40)]
    assert draws == again
    with pytest.raises(ValueError, match="generate.temperature"):
        DecodingOptions(do_sample=True, temperature=0.0)


# ---- boxes ------------------------------------------------------------------------------------------------
def test_boxes_in_generated_text_round_trip_to_their_pixels(mllm, tmp_path):
    _, stage, gen = mllm
    tok = stage.tokenizer
    image = IMAGES / "coffee.jpg"
    w, h = Image.open(image).size
    boxes = [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.55 * w, 0.3 * h, 0.9 * w, 0.95 * h]]
    text = "a cup " + box_to_text(quantize_box(boxes[0], w, h)) + " and " + box_to_text(quantize_box(boxes[1], w, h))
    token_ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    kinds = [k for k, _ in reply_pieces(token_ids, tok, gen.ids)]
    assert kinds == ["text", "box", "text", "box"]

    runner = ConversationRunner("ground", gen, None, lambda: None, DecodingOptions(), SamplingOptions(), tmp_path)
    conv = Conversation.of({"id": "g", "source": "t", "turns": [
        {"role": "user", "content": [{"image": str(image)}, {"text": "where?"}]}]})
    conv.next_prompt()
    runner._add_reply(conv, Generated(token_ids=token_ids, finished=True), [], 0)
    reply = conv.replies[0]
    cell = max(w, h) / 224
    for got, want in zip(reply["boxes"], boxes, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want)) <= cell
    drawn = Image.open(reply["boxes_image"]).convert("RGB")
    x0, y0 = (round(v) for v in reply["boxes"][0][:2])
    assert drawn.getpixel((x0 + 1, (y0 + round(reply["boxes"][0][3])) // 2)) == (255, 0, 0)
    # the reply goes back into the context as box items, which lay out as the same tokens
    assert next(i for i in conv.turns[-1]["content"] if "box" in i)["box"] == reply["boxes"][0]


# ---- every mode end to end ---------------------------------------------------------------------------------
def requests_file(tmp_path: Path, mode: str) -> Path:
    img = lambda n: {"image": str(IMAGES / n)}
    user = lambda *c: {"role": "user", "content": list(c)}
    reqs = {
        "chat": [{"id": "c", "turns": [user(img("chelsea.jpg"), {"text": "What animal?"}),
                                       {"role": "assistant", "content": [{"text": "A cat."}]},
                                       user({"text": "What colour is it?"})]},
                 {"id": "c2", "turns": [user({"text": "Hello"}), user({"text": "And again"})]}],
        "ground": [{"id": "g", "turns": [user(img("coffee.jpg"), {"text": "Where is the cup?"})]}],
        "caption": [{"id": "k", "turns": [user(img("chelsea.jpg"))]}],
        "t2i": [{"id": "t1", "turns": [user({"text": "a red apple"})]},
                {"id": "t2", "turns": [user({"text": "a blue car"})]}],
        "edit": [{"id": "e", "turns": [user(img("chelsea.jpg"), {"text": "Make it black and white"})]}],
        "recon": [{"id": "r", "turns": [user(img("astronaut.jpg"), img("coins.jpg"))]}],
        "story": [{"id": "s", "turns": [user({"text": "A cat goes to the moon."}), user({"text": "Next."})]}],
        "ppt": [{"id": "p", "turns": [user({"text": "A slide about planets"})]}],
        "tryon": [{"id": "y", "turns": [user(img("astronaut.jpg"), img("coffee.jpg"), {"text": "Wear it"})]}],
    }[mode]
    path = tmp_path / f"{mode}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_writes_results_and_images(mode, tmp_path):
    out, path = tmp_path / "out", requests_file(tmp_path, mode)
    results = generate(gen_cfg(out, ["mode=" + mode, f"requests={path}"]))
    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [r["id"] for r in results] and all(r["mode"] == mode for r in lines)
    # one reply per user turn the request leaves unanswered
    requests = [json.loads(ln) for ln in path.read_text().splitlines()]
    user_turns = {r["id"]: sum(t["role"] == "user" and [u["role"] for u in r["turns"][i + 1:i + 2]] != ["assistant"]
                               for i, t in enumerate(r["turns"])) for r in requests}
    for r in lines:
        images = [p for reply in r["replies"] for p in reply["images"]]
        if MODES[mode].image in ("first", "required") or mode == "recon":
            # an image per reply (recon: per input image), each a PNG at the de-tokenizer's resolution
            want = 2 if mode == "recon" else len(r["replies"])
            assert len(images) == want
            for p in images:
                im = Image.open(p)
                assert im.format == "PNG" and im.size == (32, 32)
        if MODES[mode].uses_llm:
            assert len(r["replies"]) == user_turns[r["id"]] >= 1
    if mode == "story":  # the second turn saw the first reply and its image (the model's own span) as context
        turns = lines[0]["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
        assert {"image": lines[0]["replies"][0]["images"][0], "generate": True} in turns[1]["content"]


def test_fixed_seed_gives_identical_text_and_pixels(tmp_path):
    req = requests_file(tmp_path, "story")
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        generate(gen_cfg(out, ["mode=story", f"requests={req}", "generate.do_sample=true", "seed=7"]))
        replies = json.loads((out / "results.jsonl").read_text())["replies"]
        runs.append(([r["raw"] for r in replies],
                     [Image.open(p).tobytes() for r in replies for p in r["images"]]))
    assert runs[0] == runs[1] and len(runs[0][1]) == 2


def test_bad_requests_fail_before_any_model_is_built(tmp_path):
    with pytest.raises(ValueError, match="mode=edit needs an input image"):
        generate(gen_cfg(tmp_path, ["mode=edit", "prompt=no image here"]))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        generate(gen_cfg(tmp_path, ["mode=chat", "prompt=hi", "image=nope.jpg"]))
    with pytest.raises(ValueError, match="mode='paint'"):
        generate(gen_cfg(tmp_path, ["mode=paint", "prompt=hi"]))
    with pytest.raises(ValueError, match="generate.sampling.sampler"):
        generate(gen_cfg(tmp_path, ["mode=t2i", "prompt=hi", "sampling.sampler=NoSuchScheduler"]))


@pytest.mark.parametrize("mode,image", [("t2i", None), ("edit", "chelsea.jpg"), ("chat", "coffee.jpg")])
def test_prompt_and_image_from_the_command_line(mode, image, tmp_path):
    """What `python -m src.generate experiment=seedx_pretrain_tiny mode=M prompt=... [image=...]` runs."""
    out = tmp_path / "D"
    overrides = [f"mode={mode}", "prompt=a red apple"] + ([f"image={IMAGES / image}"] if image else [])
    generate(gen_cfg(out, overrides))
    result = json.loads((out / "results.jsonl").read_text())
    assert result["turns"][0]["content"][-1] == {"text": "a red apple"}
    pngs = sorted(out.glob("*.png"))
    if mode != "chat":  # chat draws only if the model opens an image itself
        assert [str(p) for p in pngs] == result["replies"][0]["images"] and Image.open(pngs[0]).format == "PNG"


@pytest.mark.parametrize("mode", ["edit", "recon"])
def test_bfloat16_weights_generate_images(mode, tmp_path):
    out = tmp_path / "D"
    generate(gen_cfg(out, [f"mode={mode}", "dtype=bfloat16", f"image={IMAGES / 'chelsea.jpg'}"]
                     + (["prompt=make it grey"] if mode == "edit" else [])))
    result = json.loads((out / "results.jsonl").read_text())
    im = Image.open(result["replies"][0]["images"][0])
    assert im.size == (32, 32) and len(set(im.getdata())) > 1  # finite, not a blank image


@pytest.mark.slow
def test_cli_t2i_writes_results_and_a_png_and_help_lists_every_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "D"
    subprocess.run([sys.executable, "-m", "src.generate", "experiment=seedx_pretrain_tiny", "mode=t2i",
                    "prompt=a red apple", f"paths.output_dir={out}", *FAST], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = json.loads((out / "results.jsonl").read_text())
    assert Image.open(result["replies"][0]["images"][0]).format == "PNG"
    helped = subprocess.run([sys.executable, "-m", "src.generate", "--help"], cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True).stdout
    for mode in MODES:
        assert f"\n  {mode} " in helped and f"mode={mode} " in helped, mode


@pytest.mark.config
@pytest.mark.parametrize("experiment", ["seedx_pretrain", "seedx_detok_pretrain_tiny"])
def test_generate_config_composes_and_mode_needs_the_right_experiment(experiment, tmp_path):
    from omegaconf import OmegaConf

    from src.generate import check_experiment

    cfg = compose_cfg(experiment, tmp_path, ["mode=t2i"], config_name="generate")
    OmegaConf.resolve(cfg)
    assert cfg.model.detokenizer.unet.block_out_channels  # every such experiment names its de-tokenizer
    if experiment == "seedx_pretrain":
        assert cfg.model.detokenizer.resolution == 1024
        check_experiment(cfg, "t2i")
    else:
        check_experiment(cfg, "recon")
        with pytest.raises(ValueError, match="needs an MLLM experiment"):
            check_experiment(cfg, "chat")
