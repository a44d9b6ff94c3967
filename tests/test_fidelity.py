"""SEED-X recipe fidelity: what pre-training, instruction tuning and generation feed the model is what the
official recipe feeds it (shared/reference/official-seedx.md; shared/reviews/seedx-fidelity.md). Each test
names the item of the fidelity issue it pins; converter separators and the GRIT / SEED-Data-Edit layouts are
pinned in tests/test_data_prep*.py beside the converters' other tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.any_res import select_grid
from src.data.images import vae_view, vit_view
from src.data.mixture import MixtureSampler
from src.data.mllm_sequence import (
    EDIT_RESPONSES,
    GEN_PROMPT_RESPONSES,
    GEN_PROMPTS,
    IGNORE_INDEX,
    SeedXSequenceBuilder,
    t2i_flip,
)
from src.data.sources import DrawnRecords, RecordDataset
from src.generate import generate, options, prompt_format
from src.models.vocab import NUM_IMG_TOKENS_USED, image_token_ids
from src.pipelines.conversation import load_requests
from src.pipelines.mllm import DecodingOptions
from tests.helpers import compose_cfg, run_module_main
from tests.test_generate import gen_cfg, prompt  # the fixtures `mllm`, `tokenizer`: tests/conftest.py

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "sample" / "images"
S = 28


def make_builder(tokenizer, **kw) -> SeedXSequenceBuilder:
    kw.setdefault("chat_format", "llama2")
    return SeedXSequenceBuilder(tokenizer, vit_image_size=S, **kw)


def record(*turns, rid="r") -> dict:
    return {"id": rid, "source": "t", "turns": [{"role": role, "content": list(content)} for role, content in turns],
            "_base_dir": "/"}


def image(name="chelsea.jpg", **kw) -> dict:
    return {"image": str(IMAGES / name), **kw}


def text_before_image(tokenizer, sample) -> str:
    ids = sample["input_ids"].tolist()
    start = ids.index(image_token_ids(tokenizer).img_start)
    return tokenizer.decode(ids[1:start])


# ---- 1. multi-turn context ---------------------------------------------------------------------------------
def test_a_generated_image_in_a_prompt_is_its_own_span_with_no_vit_view(tokenizer):
    b = make_builder(tokenizer)
    rec = record(("user", [{"text": "A cat goes to the moon."}]),
                 ("assistant", [{"text": "It flew."}, image(generate=True)]),
                 ("user", [{"text": "Next."}]))
    s = b.prompt(rec)
    ids = image_token_ids(tokenizer)
    tokens = s["input_ids"].tolist()
    k = tokens.index(ids.img_start)
    assert tokens[k:k + NUM_IMG_TOKENS_USED + 2] == [ids.img_start, *ids.img[:NUM_IMG_TOKENS_USED], ids.img_end]
    assert int(s["ids_gen_mask"].sum()) == NUM_IMG_TOKENS_USED and not s["ids_cmp_mask"].any()
    assert ids.patch_start not in tokens  # no tiles of it
    # no ViT view of the model's own image is encoded; the rendered views still list it, as `generate`
    assert s["vit_pixels"].shape[0] == 0 and s["embeds_cmp_mask"].numel() == 0
    assert s["views"] == [{"kind": "global", "role": "generate", "grid": None}]


def story_requests(tmp_path: Path) -> Path:
    path = tmp_path / "story.jsonl"
    path.write_text(json.dumps({"id": "s", "turns": [
        {"role": "user", "content": [{"text": "A cat goes to the moon."}]},
        {"role": "user", "content": [{"text": "Continue the story."}]}]}) + "\n")
    return path


def test_two_turn_story_sees_its_first_image_as_a_generate_span(tmp_path):
    out = tmp_path / "out"
    results = generate(gen_cfg(out, ["mode=story", f"requests={story_requests(tmp_path)}", "save_prompts=true"]))
    first, second = results[0]["replies"]
    assert first["images"] and first["prompt"]["views"] == []
    # the second turn's prompt holds turn 1's image as the model's own span, and no input view of it
    assert second["prompt"]["views"] == [{"kind": "global", "role": "generate", "grid": None}]
    tokens = second["prompt"]["tokens"]
    assert tokens.count("<img>") == 1 and "<patch>" not in tokens
    assert tokens[tokens.index("<img>") + 1:tokens.index("</img>")] == [f"<img_{i:05d}>" for i in range(64)]
    assert second["dropped_turns"] == 0
    line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert line["replies"][1]["prompt"]["views"][0]["role"] == "generate"


# ---- 2. edit / try-on grid ---------------------------------------------------------------------------------
def test_edit_and_tryon_inputs_get_the_trained_1x1_grid(tmp_path):
    w, h = Image.open(IMAGES / "chelsea.jpg").size
    assert select_grid(w, h, tile=56) != (1, 1)  # any-res would tile it
    for mode in ("edit", "tryon"):
        (req,) = load_requests(None, "Make it blue", [str(IMAGES / "chelsea.jpg"), str(IMAGES / "coffee.jpg")], mode)
        assert [it.get("grid") for it in req["turns"][0]["content"] if "image" in it] == ["1x1", "1x1"]
    (req,) = load_requests(None, "What is it?", [str(IMAGES / "chelsea.jpg")], "chat")
    assert "grid" not in req["turns"][0]["content"][0]
    cfg = compose_cfg("seedx_sft_edit_tiny", tmp_path, ["mode=edit", f"image={IMAGES / 'chelsea.jpg'}",
                                                       "prompt=Make it blue", "dry_run=true", "progress=false"],
                      config_name="generate")
    (res,) = generate(cfg)
    assert res["prompt"]["views"] == [{"kind": "tile", "role": "input", "grid": "1x1"},
                                      {"kind": "global", "role": "input", "grid": "1x1"}]


# ---- 3. stage-2 condition image ----------------------------------------------------------------------------
def banded(size=(64, 48)) -> Image.Image:
    im = Image.new("RGB", size, (128, 128, 128))
    im.paste((255, 0, 0), (0, 0, 8, size[1]))
    im.paste((0, 0, 255), (size[0] - 8, 0, size[0], size[1]))
    return im


def test_stage2_condition_is_stretched_to_the_square_as_the_official_edit_script(tmp_path):
    from src.data.detok import DetokSampleBuilder
    from src.generate import image_decoder
    from src.models.detokenizer import encode_posterior

    im = banded()
    stretched, _, crop = vae_view(im, 32, "stretch")
    cropped, _, _ = vae_view(im, 32, "crop")
    assert crop == (0, 0)
    assert float(stretched[0, :, 0].mean()) > 0.9 and float(stretched[2, :, -1].mean()) > 0.9  # both bands kept
    assert float(cropped[0, :, 0].mean()) < 0.5  # a centre crop cuts the left band away
    cfg = gen_cfg(tmp_path, ["experiment=seedx_sft_edit_tiny"])
    decoder = image_decoder(cfg, "stage2", torch.device("cpu"), torch.float32)[0]()
    want = encode_posterior(decoder.vae, stretched[None]).mode()
    assert torch.equal(decoder.condition_latents([im], 32), want)
    # and stage 2 trains on the same view (data.image_fit), target and condition alike
    assert compose_cfg("seedx_detok_cond").data.image_fit == "stretch"
    assert compose_cfg("seedx_detok_pretrain").data.image_fit == "crop"
    path = tmp_path / "band.png"
    im.save(path)
    sample = DetokSampleBuilder(8, 32, 1, fit="stretch")(record(("user", [{"image": str(path)}]),
                                                                ("assistant", [{"image": str(path), "generate": True}])))
    assert torch.equal(sample["cond_pixels"], stretched) and torch.equal(sample["vae_pixels"], stretched)


# ---- 4. prompts longer than max_length ---------------------------------------------------------------------
def test_a_long_prompt_drops_its_oldest_turns_and_keeps_the_latest_request(tokenizer):
    long = " ".join(["word"] * 40)
    rec = record(("system", [{"text": "Be brief."}]), ("user", [{"text": long}]), ("assistant", [{"text": long}]),
                 ("user", [{"text": "Now draw the ending with a red sky."}]))
    full = make_builder(tokenizer, max_length=4096).prompt(rec)
    assert full["dropped_turns"] == 0
    b = make_builder(tokenizer, max_length=60)
    s = b.prompt(rec)
    text = tokenizer.decode(s["input_ids"])
    assert s["input_ids"][0] == tokenizer.bos_token_id and "red sky" in text and "Be brief." in text
    assert "word" not in text and s["dropped_turns"] == 2 and len(s["input_ids"]) <= 60
    with pytest.raises(ValueError, match="too_long: even the latest request"):
        make_builder(tokenizer, max_length=8).prompt(rec)


# ---- 5. replies that run past their image ------------------------------------------------------------------
def scripted(monkeypatch, script):
    """next_tokens replaced by a script of the free (non-forced) choices: call k returns script(k)."""
    calls = {"n": 0, "logits": []}

    def fake(logits, options, generator):
        calls["logits"].append(logits.clone())
        k = calls["n"]
        calls["n"] += 1
        return torch.full((logits.shape[0],), script(k), dtype=torch.long, device=logits.device)

    monkeypatch.setattr("src.pipelines.mllm.next_tokens", fake)
    return calls


def test_required_replies_run_on_after_their_image_until_eos(mllm, monkeypatch):
    cfg, stage, gen = mllm
    tok, ids = stage.tokenizer, gen.ids
    word = tok.encode("sun", add_special_tokens=False)[-1]
    span = [ids.img_start, *ids.img[:NUM_IMG_TOKENS_USED], ids.img_end]
    # free choices: <img> first, then (after 65 forced tokens) a word, then </s>
    script = lambda k: ids.img_start if k == 0 else tok.eos_token_id if k == 67 else word
    scripted(monkeypatch, script)
    (r,) = gen.generate([prompt(gen_builder(cfg, stage), "A slide about the sun")],
                        DecodingOptions(image="required", max_new_tokens=20))
    assert r.token_ids == [*span, word, tok.eos_token_id] and len(r.images) == 1 and r.finished
    scripted(monkeypatch, script)
    (r,) = gen.generate([prompt(gen_builder(cfg, stage), "a sun")], DecodingOptions(image="first", max_new_tokens=20))
    assert r.token_ids == span  # the pre-trained `{caption}<img>` reply is the image alone


def test_a_reply_ends_where_the_model_starts_the_next_turn(mllm, monkeypatch):
    cfg, stage, gen = mllm
    tok = stage.tokenizer
    seq = tok.encode("fine\n[INST] more", add_special_tokens=False)
    scripted(monkeypatch, lambda k: seq[k] if k < len(seq) else tok.eos_token_id)
    (r,) = gen.generate([prompt(gen_builder(cfg, stage), "hi")],
                        DecodingOptions(max_new_tokens=20, stop_texts=("[INST]",)))
    assert "[INST]" not in tok.decode(r.token_ids) and tok.decode(r.token_ids).strip().startswith("fine") and r.finished


def gen_builder(cfg, stage):
    from src.generate import sequence_builder

    return sequence_builder(cfg, stage.tokenizer, "chat", "pretrained")


# ---- 6. grounding prompt of the pre-trained model ----------------------------------------------------------
def test_pretrained_grounding_is_the_official_bbox_prompt_with_box_start_forced(tmp_path, mllm, monkeypatch):
    cfg = gen_cfg(tmp_path, ["mode=ground", f"image={IMAGES / 'chelsea.jpg'}", "prompt=a cat", "dry_run=true"])
    (res,) = generate(cfg)
    _, stage, gen = mllm
    text = stage.tokenizer.convert_tokens_to_string(res["prompt"]["tokens"])
    assert text.rstrip().endswith("a cat [[") and "Question" not in text and res["prompt_format"] == "pretrained"
    decoding, _ = options(cfg, "ground", "pretrained")
    assert decoding.box_first and not options(cfg, "ground", "instruct")[0].box_first
    (r,) = gen.generate([prompt(gen_builder(cfg, stage), "a cat", ["chelsea.jpg"])],
                        DecodingOptions(max_new_tokens=2, box_first=True))
    assert r.token_ids[0] == gen.ids.box_start


# ---- 7. generation defaults --------------------------------------------------------------------------------
def test_official_generation_defaults_and_no_image_tokens_outside_a_span(tmp_path, mllm, monkeypatch):
    assert compose_cfg("seedx_pretrain_tiny", config_name="generate").generate.max_new_tokens == 512
    assert DecodingOptions().max_new_tokens == 512
    cfg, stage, gen = mllm
    calls = scripted(monkeypatch, lambda k: stage.tokenizer.eos_token_id)
    gen.generate([prompt(gen_builder(cfg, stage), "hi")], DecodingOptions(max_new_tokens=3))
    banned = [*gen.ids.img[:NUM_IMG_TOKENS_USED], gen.ids.img_end]
    assert torch.isinf(calls["logits"][0][:, banned]).all() and torch.isfinite(calls["logits"][0][:, :100]).all()
    (res,) = generate(compose_cfg("seedx_sft_i_tiny", tmp_path, ["mode=t2i", "prompt=a red apple", "dry_run=true"],
                                  config_name="generate"))
    text = stage.tokenizer.convert_tokens_to_string(res["prompt"]["tokens"])
    assert "[INST] Generate an image: a red apple [/INST]" in text and res["prompt_format"] == "instruct"


def test_dry_run_builds_no_model(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("src.generate.build_mllm", refuse)
    monkeypatch.setattr("src.generate.build_detokenizer", refuse)
    (res,) = generate(gen_cfg(tmp_path, ["mode=chat", "prompt=Hello", "dry_run=true"]))
    assert res["dry_run"] and res["prompt"]["tokens"][0] == "<s>"
    assert json.loads((tmp_path / "results.jsonl").read_text())["id"] == res["id"]


# ---- 8. prompt format of a checkpoint ----------------------------------------------------------------------
def test_prompt_format_follows_the_checkpoints_own_stage():
    pretrain = compose_cfg("seedx_pretrain_tiny", config_name="generate")
    assert prompt_format(pretrain) == "pretrained"
    assert prompt_format(pretrain, {"hyper_parameters": {"init_from": "/runs/pre/last.ckpt"}}) == "instruct"
    assert prompt_format(pretrain, {"hyper_parameters": {"model": {}}}) == "pretrained"
    assert prompt_format(compose_cfg("seedx_sft_i_tiny", config_name="generate")) == "instruct"


# ---- 9. pre-training data ----------------------------------------------------------------------------------
def test_pretraining_has_no_instruction_template_and_no_edit_data(tmp_path):
    from src.inspect_data import rendered_records

    cfg = compose_cfg("seedx_pretrain")
    assert cfg.data.chat_format == "qa" and cfg.data.t2i_chat_format == "plain"
    assert [s["name"] for s in cfg.data.train_sources] == ["captions"]
    assert not cfg.data.gen_prompts and not cfg.data.edit_responses
    with_edit = compose_cfg("seedx_pretrain", overrides=["data=mllm_pretrain_with_edit"])
    assert [s["name"] for s in with_edit.data.train_sources] == ["captions", "edit"]
    cfg = compose_cfg("seedx_pretrain_tiny", overrides=[f"+records={ROOT / 'assets/sample/sft_chat.jsonl'}", "+limit=1"])
    (line,) = rendered_records(cfg)
    text = "".join(line["tokens"]).replace("\u2581", " ")
    assert "Question:" in text and "Answer:" in text and "[INST]" not in text


# ---- 11. official SFT wrappers -----------------------------------------------------------------------------
def test_sft_caption_to_image_samples_ask_with_an_official_prompt_and_response(tokenizer):
    b = make_builder(tokenizer, t2i_chat_format="llama2", t2i_ratio=1.0, gen_prompts=True)
    pair = record((None, [image(), {"text": "a cat on a sofa"}]), rid="pair")
    seen = set()
    for pos in range(30):
        s = b(pair, draw=(0, pos))
        head = text_before_image(tokenizer, s)
        k = next(i for i, p in enumerate(GEN_PROMPTS) if head.startswith(f"[INST] {p} a cat on a sofa [/INST]"))
        assert head.endswith(f"[/INST]\n {GEN_PROMPT_RESPONSES[k]}")
        start = s["input_ids"].tolist().index(image_token_ids(tokenizer).img_start)
        assert (s["labels"][:start] == IGNORE_INDEX).all() and s["labels"][start] == s["input_ids"][start]
        seen.add(k)
        assert torch.equal(b(pair, draw=(0, pos))["input_ids"], s["input_ids"])  # a resume draws the same
    assert len(seen) > 5
    # a converted caption -> image request (convert_llava --generation) is wrapped the same way
    req = record(("user", [{"text": "a cat on a sofa"}]), ("assistant", [image(generate=True)]))
    assert "[/INST]\n " in text_before_image(tokenizer, b(req, draw=(1, 2)))
    assert text_before_image(tokenizer, make_builder(tokenizer)(req)) == "[INST] a cat on a sofa [/INST]\n"


def test_edit_answers_get_an_official_supervised_reply_before_the_image(tokenizer):
    b = make_builder(tokenizer, edit_responses=True)
    rec = record(("user", [image(grid="1x1"), {"text": "Make it blue"}]), ("assistant", [image("coffee.jpg", generate=True)]))
    replies = set()
    for pos in range(40):
        s = b(rec, draw=(0, pos))
        ids = s["input_ids"].tolist()
        last_img = len(ids) - 1 - ids[::-1].index(image_token_ids(tokenizer).img_start)  # the answer's image
        reply = tokenizer.decode(ids[:last_img]).split("[/INST]")[-1].strip()
        assert reply in EDIT_RESPONSES
        replies.add(reply)
        if reply:  # supervised, as the official sft_clm.py labels it
            assert (s["labels"] != IGNORE_INDEX).sum() > 2
    assert len(replies) > 5 and "" in EDIT_RESPONSES
    own = record(("user", [image(grid="1x1"), {"text": "Make it blue"}]),
                 ("assistant", [{"text": "Here it is in blue."}, image("coffee.jpg", generate=True)]))
    assert "Here it is in blue." in tokenizer.decode(b(own, draw=(0, 1))["input_ids"])


# ---- 13. caption-pair direction per use --------------------------------------------------------------------
def test_caption_pair_direction_is_drawn_per_use_yet_resumes_exactly(tokenizer):
    per_epoch = [[t2i_flip(0, "pair", 0.5, (e, p)) for p in range(16)] for e in range(3)]
    assert len({tuple(e) for e in per_epoch}) == 3 and all(any(e) and not all(e) for e in per_epoch)
    sampler = MixtureSampler([3], [1.0], num_samples=6, seed=1, with_draws=True)
    draws = list(sampler)
    assert [d[1:] for d in draws] == [(0, p) for p in range(6)] and sorted({d[0] for d in draws}) == [0, 1, 2]
    resumed = MixtureSampler([3], [1.0], num_samples=6, seed=1, with_draws=True)
    resumed.load_state_dict({"epoch": 0, "consumed": 4})
    assert list(resumed) == draws[4:]
    got = []
    ds = DrawnRecords([RecordDataset([{"id": "a"}], lambda r, draw=None: got.append((r["id"], draw)))])
    ds[(0, 2, 5)]
    ds[0]
    assert got == [("a", (2, 5)), ("a", None)]


# ---- 14. smaller items -------------------------------------------------------------------------------------
def test_generation_target_is_the_any_res_global_view(tokenizer):
    b = make_builder(tokenizer)
    im = Image.open(IMAGES / "chelsea.jpg").convert("RGB")
    got = b.image_views(im, {"image": "x", "generate": True})
    assert torch.equal(got[0], vit_view(im.resize((S, S)), S))  # PIL's bicubic, as the official global view
    assert not torch.equal(got[0], vit_view(im, S))


def test_a_cut_that_leaves_no_supervised_token_is_skipped(tokenizer):
    b = make_builder(tokenizer, max_length=20)
    rec = record(("user", [{"text": " ".join(["word"] * 40)}]), ("assistant", [{"text": "yes"}]))
    assert b(rec)["skipped"].reason == "no_supervised_token"
    doc = record((None, [{"text": " ".join(["word"] * 40)}]))
    assert b(doc)["truncated"]  # a cut document keeps its (supervised) text


def test_sft_defaults_are_the_official_ones():
    for task in ("i", "edit", "ppt", "story", "tryon"):
        cfg = compose_cfg(f"seedx_sft_{task}")
        assert cfg.stage.scheduler.warmup_steps == 500 and cfg.trainer.accumulate_grad_batches == 2
        assert cfg.data.t2i_ratio == 1.0 and cfg.data.gen_prompts and cfg.data.chat_format == "llama2"
        assert cfg.data.edit_responses == (task == "edit")


# ---- the tools ---------------------------------------------------------------------------------------------
def test_inspect_data_renders_records_as_the_datamodule_builds_them(tmp_path, capsys):
    from src.inspect_data import main

    records = tmp_path / "r.jsonl"
    for name in ("chelsea.jpg", "coffee.jpg"):
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    good = {"id": "s/1", "source": "s", "turns": [
        {"role": "user", "content": [{"image": "chelsea.jpg", "grid": "1x1"}, {"text": "Make it blue"}]},
        {"role": "assistant", "content": [{"image": "coffee.jpg", "generate": True}]}]}
    records.write_text(json.dumps(good) + "\n" + json.dumps({"id": "s/2", "source": "s", "turns": []}) + "\n")
    code, stdout, stderr = run_module_main(main, ["experiment=seedx_sft_edit_tiny", f"records={records}", "limit=5"],
                                           capsys)
    assert code == 0, stderr[-2000:]
    first, second = (json.loads(ln) for ln in stdout.splitlines())
    assert first["id"] == "s/1" and first["skipped"] is None and not first["truncated"]
    assert len(first["tokens"]) == len(first["ce"]) == len(first["gen"])
    assert sum(first["gen"]) == 64 and first["ce"][first["tokens"].index("<img>", 140)]
    assert [(v["kind"], v["role"], v["grid"]) for v in first["views"]] == [
        ("tile", "input", "1x1"), ("global", "input", "1x1"), ("global", "generate", None)]
    assert second["skipped"] == "bad_schema" and second["tokens"] == []
