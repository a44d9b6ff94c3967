"""SEED-LLaMA: image codes in the vocabulary, the discrete sequence layout and its labels, the stages, and the
offline image tokenisation that feeds them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_prep.make_tiny_tokenizer import corpus_lines
from src.data.mllm import load_tokenizer
from src.data.mllm_sequence import IGNORE_INDEX
from src.data.seed_llama import SeedLlamaSequenceBuilder
from src.models.vocab import NUM_IMAGE_CODES, add_seed_llama_tokens, seed_llama_token_ids
from tests.conftest import ROOT
from tests.helpers import built_stage, compose_cfg, tiny_run_cfg, trained_tiny_stage

TOKENIZER = ROOT / "assets" / "tokenizers" / "tiny-llama"
BASE_VOCAB = 1000
CODES = list(range(100, 132))  # one image's 32 codes


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER), extend=add_seed_llama_tokens)


def _builder(tokenizer, **kw):
    return SeedLlamaSequenceBuilder(tokenizer, max_length=512, **kw)


def _image(codes=CODES, **extra):
    return {"image": "x.jpg", "codes": list(codes), **extra}


def _record(turns, rid="r"):
    return {"id": rid, "source": "test", "turns": turns}


def _text_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---- vocabulary ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_image_ids_map_to_and_from_codes_without_collision_with_text_ids(tokenizer):
    ids = seed_llama_token_ids(tokenizer)
    assert len(set(ids.codes)) == NUM_IMAGE_CODES
    assert list(ids.codes) == list(range(BASE_VOCAB, BASE_VOCAB + NUM_IMAGE_CODES))  # right after the text vocab
    assert {ids.img_start, ids.img_end} == {BASE_VOCAB + NUM_IMAGE_CODES, BASE_VOCAB + NUM_IMAGE_CODES + 1}
    assert len(tokenizer) == BASE_VOCAB + NUM_IMAGE_CODES + 2
    every = torch.arange(NUM_IMAGE_CODES)
    assert torch.equal(ids.codes_of(ids.code_ids(every)), every)  # a round trip for every code
    text = torch.arange(BASE_VOCAB)
    assert bool((ids.codes_of(text) == -1).all()) and not bool(ids.is_code(text).any())
    assert int(ids.codes_of(torch.tensor([ids.img_start]))) == -1
    # real text never encodes to an image id, and an image id decodes to its own token
    for line in corpus_lines()[:50]:
        assert max(_text_ids(tokenizer, line)) < BASE_VOCAB
    assert tokenizer.decode([ids.codes[5]]) == "<img_00005>"
    with pytest.raises(ValueError, match="image codes must be in"):
        ids.code_ids(torch.tensor([NUM_IMAGE_CODES]))
    assert add_seed_llama_tokens(tokenizer) == 0  # idempotent


# ---- sequences and labels -----------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("image_ce", [True, False])
def test_document_labels_cover_text_and_image_codes_as_configured(tokenizer, image_ce):
    ids = seed_llama_token_ids(tokenizer)
    rec = _record([{"role": None, "content": [_image(), {"text": "A red car."}]}])
    s = _builder(tokenizer, image_ce=image_ce)(rec)
    text = _text_ids(tokenizer, "A red car.")
    image = [ids.img_start, *ids.code_ids(torch.tensor(CODES)).tolist(), ids.img_end]
    assert s["input_ids"].tolist() == [tokenizer.bos_token_id, *image, *text, tokenizer.eos_token_id]
    labels = s["labels"].tolist()
    assert labels[0] == IGNORE_INDEX
    assert labels[1 + len(image):] == [*text, tokenizer.eos_token_id]  # text (and </s>) always supervised
    assert labels[1:1 + len(image)] == (image if image_ce else [IGNORE_INDEX] * len(image))
    assert s["vit_pixels"].shape[0] == 0 and not s["ids_cmp_mask"].any()  # no pixels anywhere


@pytest.mark.unit
def test_caption_pairs_train_in_both_directions(tokenizer):
    ids = seed_llama_token_ids(tokenizer)
    rec = _record([{"role": None, "content": [_image(), {"text": "A red car."}]}])
    b = _builder(tokenizer)
    i2t, t2i = b(rec, t2i=False), b(rec, t2i=True)
    text = _text_ids(tokenizer, "A red car.")
    image = [ids.img_start, *ids.code_ids(torch.tensor(CODES)).tolist(), ids.img_end]
    assert t2i["input_ids"].tolist() == [tokenizer.bos_token_id, *text, *image, tokenizer.eos_token_id]
    assert t2i["labels"].tolist()[1:] == [*text, *image, tokenizer.eos_token_id]  # caption and codes supervised
    assert i2t["input_ids"].tolist()[1:1 + len(image)] == image
    # t2i_ratio draws the direction per record id, the same on every rank and resume
    flips = [b.__class__(tokenizer, t2i_ratio=0.5, max_length=512)(_record(rec["turns"], f"r{i}"))["input_ids"][1]
             for i in range(40)]
    assert 5 < sum(int(f) == ids.img_start for f in flips) < 35


@pytest.mark.unit
def test_chat_labels_follow_the_roles(tokenizer):
    ids = seed_llama_token_ids(tokenizer)
    rec = _record([{"role": "user", "content": [_image(), {"text": "Draw it in red."}]},
                   {"role": "assistant", "content": [{"text": "Here:"}, _image(range(7000, 7032), generate=True)]}])
    s = _builder(tokenizer, chat_format="llama2")(rec)
    got, labels = s["input_ids"].tolist(), s["labels"].tolist()
    starts = [i for i, t in enumerate(got) if t == ids.img_start]
    assert len(starts) == 2
    user_img, gen_img = starts
    assert all(lab == IGNORE_INDEX for lab in labels[: user_img + 34])  # the user turn, its image included
    assert labels[gen_img: gen_img + 34] == got[gen_img: gen_img + 34]  # the generated image's codes get CE
    assert ids.codes_of(torch.tensor(got[gen_img + 1: gen_img + 33])).tolist() == list(range(7000, 7032))
    answer = _text_ids(tokenizer, "Here:")
    assert labels[gen_img - len(answer): gen_img] == answer


@pytest.mark.unit
@pytest.mark.parametrize(("item", "reason"), [
    ({"image": "x.jpg"}, "missing_codes"),
    (_image(CODES[:31]), "bad_codes"),
    (_image([NUM_IMAGE_CODES] * 32), "bad_codes"),
    (_image([True] * 32), "bad_codes"),
    ({"box": [1, 2, 3, 4]}, "box_unsupported"),
])
def test_bad_image_codes_and_boxes_are_skipped_with_their_reason(tokenizer, item, reason):
    rec = _record([{"role": None, "content": [_image(), {"text": "t"}, item]}])
    out = _builder(tokenizer)(rec)
    assert out["skipped"].reason == reason and out["skipped"].id == "r"


# ---- stages -------------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("experiment", ["seed_llama_pretrain_tiny", "seed_llama_sft_tiny"])
def test_tiny_seed_llama_experiments_train_three_steps(experiment, tmp_path):
    from src.train import train

    train(tiny_run_cfg(experiment, tmp_path, ["trainer.max_steps=3"]))
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("loss", "loss_ce", "loss_ce_text", "loss_ce_image"):
        assert torch.isfinite(torch.tensor(m[f"train/{k}"])) and m[f"train/{k}"] > 0, k
    if experiment == "seed_llama_sft_tiny":
        assert m["data/skipped/box_unsupported"] >= 1  # the bundled grounding chat: counted, not a crash


@pytest.mark.smoke
def test_loss_splits_into_text_and_image_code_tokens(tmp_path):
    stage = built_stage("seed_llama_pretrain_tiny", tmp_path)
    ids = seed_llama_token_ids(stage.tokenizer)
    rec = _record([{"role": None, "content": [_image(), {"text": "A red car."}]}])
    s = SeedLlamaSequenceBuilder(stage.tokenizer, max_length=512)(rec)
    batch = {"input_ids": s["input_ids"][None], "labels": s["labels"][None]}
    out = stage.compute_losses(batch, "val")
    with torch.no_grad():
        logits = stage.mllm.llm(input_ids=batch["input_ids"]).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, s["labels"][1:], reduction="none")
    code = ids.is_code(s["labels"][1:])
    torch.testing.assert_close(out["loss_ce_image"], ce[code].mean())
    torch.testing.assert_close(out["loss_ce_text"], ce[~code].mean())
    torch.testing.assert_close(out["loss"], ce.mean())


@pytest.mark.smoke
def test_sft_starts_from_the_pretraining_checkpoint(tmp_path):
    pre, ckpt = trained_tiny_stage("seed_llama_pretrain_tiny", tmp_path)
    sft = built_stage("seed_llama_sft_tiny", tmp_path / "sft", f"stage.init_from={ckpt}")
    x = torch.randint(0, len(pre.tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sft.mllm.llm(input_ids=x).logits, pre.mllm.llm(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)
    task_b = [p for n, p in sft.mllm.llm.named_parameters() if ".lora_B.default." in n]
    assert task_b and all(bool((p == 0).all()) for p in task_b)  # a fresh task LoRA on the merged start


@pytest.mark.smoke
def test_full_finetuning_trains_the_whole_llm_and_needs_something_to_train(tmp_path):
    stage = built_stage("seed_llama_pretrain_tiny", tmp_path, "stage.full_finetune=true", "stage.lora.enabled=false")
    params = list(stage.mllm.llm.named_parameters())
    assert params and all(p.requires_grad for _, p in params) and not any("lora_" in n for n, _ in params)
    with pytest.raises(Exception, match="nothing would train"):  # at instantiation, before any build
        built_stage("seed_llama_pretrain_tiny", tmp_path, "stage.lora.enabled=false")


@pytest.mark.config
@pytest.mark.parametrize("experiment", ["seed_llama_pretrain", "seed_llama_sft"])
def test_seed_llama_full_size_on_meta(experiment):
    from src.inspect import build_on_meta, count_parameters

    counts = count_parameters(build_on_meta(compose_cfg(experiment)))
    llama2_13b, width, layers = 13_015_864_320, 5120, 40
    new_rows = NUM_IMAGE_CODES + 2
    lora = layers * 16 * (4 * 2 * width + 2 * (width + 13824) + (13824 + width))  # r16 on q k v o gate up down
    assert counts["lora_trainable"] == lora == 62_586_880
    assert counts["total"] == llama2_13b + 2 * new_rows * width + lora
    # what trains besides LoRA: the (resized) embeddings, lm_head and the norms
    embed = (32000 + new_rows) * width
    norms = (2 * layers + 1) * width
    assert counts["trainable"] == lora + 2 * embed + norms


# ---- offline tokenisation ---------------------------------------------------------------------------------
@pytest.mark.smoke
def test_tokenize_images_writes_the_codes_the_tokenizer_gives(tmp_path):
    from data_prep.tokenize_images import main
    from src.data.images import vit_view
    from src.data.records import load_image, read_jsonl
    from src.specs.inference import build_image_tokenizer

    main(["--experiment", "seed_tokenizer_v2_tiny", "--source", str(ROOT / "assets/sample/captions.jsonl"),
          "--source", str(ROOT / "assets/sample/sft_chat.jsonl"), "--out", str(tmp_path), "--device", "cpu"])
    records = [r for r in read_jsonl(tmp_path / "captions.jsonl")]
    assert len(records) == 10  # 12 lines, the corrupt and the missing image skipped ...
    skipped = [json.loads(x)["reason"] for x in (tmp_path / "captions.skipped.jsonl").read_text().splitlines()]
    assert sorted(skipped) == ["corrupt_image", "missing_file"]  # ... and logged with their reason
    stage = build_image_tokenizer(None, "seed_tokenizer_v2_tiny")
    for r in records[:3]:
        item = r["turns"][0]["content"][0]
        view = vit_view(load_image(r, item), stage.vit_cfg.image_size)
        assert item["codes"] == stage.codes_of(view[None])[0].tolist()
    # the bundled sample is what this command writes (deterministic: tiny twins are seeded)
    for name in ("captions", "sft_chat"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (ROOT / f"assets/seed_codes/{name}.jsonl").read_text()
    # --shards: the same records as webdataset shards, images inside, readable as a record source
    from src.data.records import read_shards

    main(["--experiment", "seed_tokenizer_v2_tiny", "--source", str(ROOT / "assets/sample/captions.jsonl"),
          "--out", str(tmp_path / "shards"), "--shards", "--device", "cpu"])
    sharded = [r for r in read_shards(str(tmp_path / "shards" / "captions" / "captions-000000.tar"))]
    assert [r["turns"][0]["content"][0]["codes"] for r in sharded] == [
        r["turns"][0]["content"][0]["codes"] for r in records]
    shutil.rmtree(tmp_path / "images")


# ---- generation -----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_generate_captions_and_draws_with_seed_llama(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from src.generate import generate

    def run(mode, *extra):
        out = tmp_path / mode
        cfg = compose_cfg("seed_llama_pretrain_tiny", out, [
            f"mode={mode}", "image_tokenizer.experiment=seed_tokenizer_v2_tiny", "seed_decode.steps=2",
            "generate.max_new_tokens=6", "progress=false", *extra], config_name="generate")
        OmegaConf.resolve(cfg)
        return generate(cfg), out

    (drawn,), out = run("t2i", "prompt=a red apple")
    assert len(drawn["codes"]) == 32 and all(0 <= c < NUM_IMAGE_CODES for c in drawn["codes"])
    image = Image.open(drawn["image"])
    assert image.format == "PNG" and image.size == (32, 32)  # the tiny unCLIP decoder's resolution
    assert json.loads((out / "results.jsonl").read_text())["codes"] == drawn["codes"]
    again, _ = run("t2i", "prompt=a red apple")
    assert again[0]["codes"] == drawn["codes"]  # greedy: the same codes every time
    (captioned,), _ = run("caption", f"image={ROOT / 'assets/sample/images/coffee.jpg'}")
    assert captioned["codes"] is None and "<img" not in captioned["text"]
    with pytest.raises(ValueError, match="SEED-LLaMA experiment answers"):
        run("edit", f"image={ROOT / 'assets/sample/images/coffee.jpg'}", "prompt=hi")


# ---- exact resume ---------------------------------------------------------------------------------------------
def _logged_losses(out) -> dict[int, str]:
    import csv

    with open(out / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.smoke
@pytest.mark.parametrize("experiment", ["seed_llama_pretrain_tiny", "seed_tokenizer_qformer_tiny", "seed_tokenizer_v2_tiny"])
def test_a_resumed_run_gives_the_uninterrupted_losses(experiment, tmp_path):
    """Same data position, same ITM negatives (stage 1 draws them per step), same optimiser state."""
    from src.train import train

    # a constant schedule: the first run's max_steps=2 must not change the learning rates the second one sees
    common = ["+logger.csv.flush_logs_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
              "stage.scheduler.name=constant", "stage.scheduler.warmup_steps=0"]
    train(tiny_run_cfg(experiment, tmp_path / "straight", ["trainer.max_steps=4", *common]))
    train(tiny_run_cfg(experiment, tmp_path / "first", ["trainer.max_steps=2", *common]))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(tiny_run_cfg(experiment, tmp_path / "second", ["trainer.max_steps=4", f"ckpt_path={ckpt}", *common]))
    straight = _logged_losses(tmp_path / "straight")
    resumed = {**_logged_losses(tmp_path / "first"), **_logged_losses(tmp_path / "second")}
    assert sorted(resumed) == sorted(straight) == [0, 1, 2, 3]
    assert resumed == straight
