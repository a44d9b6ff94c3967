"""SEED-X MLLM token layout: markers, labels, image masks, views, t2i flips, bad input, truncation."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.bbox import quantize_box
from src.data.mllm_sequence import IGNORE_INDEX, SeedXSequenceBuilder, t2i_flip
from src.data.records import SkippedSample
from src.models.vocab import image_token_ids

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
S = 28  # tiny ViT view (and any-res tile) size keeps the tests fast
N = 64


@pytest.fixture(scope="module")
def ids(tokenizer):
    return image_token_ids(tokenizer)


@pytest.fixture
def images(tmp_path):
    """Solid-colour images of known sizes: square (2x2 grid at tile 28), small (1x1), wide (2x1)."""
    spec = {"square.png": ((60, 60), (255, 0, 0)), "small.png": ((30, 30), (0, 0, 255)),
            "wide.png": ((40, 20), (0, 255, 0)), "tiny.png": ((4, 4), (9, 9, 9))}
    for name, (size, colour) in spec.items():
        Image.new("RGB", size, colour).save(tmp_path / name)
    return tmp_path


def make_builder(tokenizer, **kw):
    kw.setdefault("vit_image_size", S)
    kw.setdefault("max_length", 4096)
    return SeedXSequenceBuilder(tokenizer, **kw)


def rec(base, turns, rid="t/0", source="t"):
    return {"id": rid, "source": source, "turns": turns, "_base_dir": str(base), "_where": f"test:{rid}"}


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def span(start, end, ids):
    return [start, *ids.img[:N], end]


def supervised_positions(sample):
    return torch.nonzero(sample["labels"] != IGNORE_INDEX).flatten().tolist()


def check_masks(sample, ids):
    """64 mask positions per view, exactly the slot tokens inside each span, cmp XOR gen per view."""
    inp = sample["input_ids"]
    n_cmp, n_gen = int(sample["embeds_cmp_mask"].sum()), int(sample["embeds_gen_mask"].sum())
    assert int(sample["ids_cmp_mask"].sum()) == N * n_cmp
    assert int(sample["ids_gen_mask"].sum()) == N * n_gen
    assert not (sample["ids_cmp_mask"] & sample["ids_gen_mask"]).any()
    assert bool((sample["embeds_cmp_mask"] ^ sample["embeds_gen_mask"]).all())
    for mask in (sample["ids_cmp_mask"], sample["ids_gen_mask"]):
        tokens = inp[mask].view(-1, N)
        assert (tokens == torch.tensor(ids.img[:N])).all()
    assert (sample["labels"][sample["ids_cmp_mask"] | sample["ids_gen_mask"]] == IGNORE_INDEX).all()
    n_views = sample["vit_pixels"].shape[0]
    assert sample["patch_positions"].shape == (n_views, 2)
    assert sample["embeds_cmp_mask"].shape == (n_views,)


# ------------------------------------------------------------------------------------------- layouts
def test_image_caption_pair_with_2x2_image(tokenizer, ids, images):
    caption = "A red square."
    sample = make_builder(tokenizer)(rec(images, [{"role": None, "content": [{"image": "square.png"},
                                                                               {"text": caption}]}]))
    inp, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    cap = enc(tokenizer, caption)
    expected = [tokenizer.bos_token_id]
    expected += span(ids.patch_start, ids.patch_end, ids) * 4 + span(ids.img_start, ids.img_end, ids)
    expected += cap + [tokenizer.eos_token_id]
    assert inp == expected
    assert inp.count(ids.patch_start) == inp.count(ids.patch_end) == 4
    assert inp.count(ids.img_start) == inp.count(ids.img_end) == 1
    # CE exactly on the caption and EOS
    assert labels == [IGNORE_INDEX] * (len(inp) - len(cap) - 1) + cap + [tokenizer.eos_token_id]
    assert sample["vit_pixels"].shape == (5, 3, S, S)
    assert sample["embeds_cmp_mask"].all() and not sample["embeds_gen_mask"].any()
    assert sample["patch_positions"].tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75],
                                                  [0.5, 0.5]]
    assert sample["id"] == "t/0" and sample["source"] == "t" and sample["truncated"] is False
    check_masks(sample, ids)


def test_one_by_one_grid_still_has_a_tile_and_the_global_view(tokenizer, ids, images):
    sample = make_builder(tokenizer)(rec(images, [{"role": None, "content": [{"image": "square.png", "grid": "1x1"},
                                                                               {"text": "x"}]}]))
    inp = sample["input_ids"].tolist()
    assert inp[1:1 + 2 * (N + 2)] == span(ids.patch_start, ids.patch_end, ids) + span(ids.img_start, ids.img_end, ids)
    assert sample["vit_pixels"].shape[0] == 2


def test_caption_to_image(tokenizer, ids, images):
    caption = "A red square."
    sample = make_builder(tokenizer)(rec(images, [{"role": None, "content": [
        {"text": caption}, {"image": "square.png", "generate": True}]}]))
    inp, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    cap = enc(tokenizer, caption)
    assert inp == [tokenizer.bos_token_id] + cap + span(ids.img_start, ids.img_end, ids) + [tokenizer.eos_token_id]
    # CE on caption, on <img> (the model learns where an image starts) and on EOS after </img>;
    # not on the 64 image tokens nor on </img>
    boi = 1 + len(cap)
    assert supervised_positions(sample) == list(range(1, boi + 1)) + [len(inp) - 1]
    assert labels[boi] == ids.img_start and labels[-1] == tokenizer.eos_token_id
    assert labels[boi + N + 1] == IGNORE_INDEX  # </img>
    assert torch.nonzero(sample["ids_gen_mask"]).flatten().tolist() == list(range(boi + 1, boi + 1 + N))
    assert not sample["ids_cmp_mask"].any()
    assert sample["vit_pixels"].shape == (1, 3, S, S)  # the global view only, no tiles
    assert sample["embeds_gen_mask"].tolist() == [True] and sample["patch_positions"].tolist() == [[0.5, 0.5]]
    check_masks(sample, ids)


def test_chat_with_input_image_and_assistant_box(tokenizer, ids, images):
    box = [10, 2, 30, 18]  # pixels of wide.png (40x20)
    record = rec(images, [
        {"role": "system", "content": [{"text": "You are helpful."}]},
        {"role": "user", "content": [{"image": "wide.png"}, {"text": "Where is it?"}]},
        {"role": "assistant", "content": [{"text": "Here"}, {"box": box, "label": "it"}, {"text": "."}]},
        {"role": "user", "content": [{"text": "Thanks"}]},
        {"role": "assistant", "content": [{"text": "Welcome"}]},
    ])
    sample = make_builder(tokenizer)(record)
    inp, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    q = quantize_box(box, 40, 20)
    box_ids = [ids.box_start, *(ids.loc[v] for v in q), ids.box_end]
    image = span(ids.patch_start, ids.patch_end, ids) * 2 + span(ids.img_start, ids.img_end, ids)  # 2x1 grid
    prompt1, tail1 = enc(tokenizer, "You are helpful.\n[INST] "), enc(tokenizer, "Where is it? [/INST]\n")
    answer1 = enc(tokenizer, "Here") + box_ids + enc(tokenizer, ".")
    prompt2, answer2 = enc(tokenizer, "\n[INST] Thanks [/INST]\n"), enc(tokenizer, "Welcome")
    assert inp == ([tokenizer.bos_token_id] + prompt1 + image + tail1 + answer1 + prompt2 + answer2
                   + [tokenizer.eos_token_id])
    n_prompt1 = 1 + len(prompt1) + len(image) + len(tail1)
    assert labels == ([IGNORE_INDEX] * n_prompt1 + answer1 + [IGNORE_INDEX] * len(prompt2)
                      + answer2 + [tokenizer.eos_token_id])
    text = tokenizer.decode(sample["input_ids"])
    assert "[INST]" in text and "[/INST]" in text
    assert sample["vit_pixels"].shape[0] == 3 and sample["embeds_cmp_mask"].all()
    assert sample["patch_positions"].tolist() == [[0.25, 0.5], [0.75, 0.5], [0.5, 0.5]]
    check_masks(sample, ids)


def test_interleaved_views_follow_span_order(tokenizer, ids, images):
    """cmp views in span order (red tiles+global, then green), the gen view (blue) between them."""
    record = rec(images, [{"role": None, "content": [
        {"image": "square.png", "grid": "1x1"}, {"text": "then"}, {"image": "small.png", "generate": True},
        {"text": "and"}, {"image": "wide.png"}]}])
    sample = make_builder(tokenizer)(record)
    check_masks(sample, ids)
    colour = sample["vit_pixels"].mean(dim=(2, 3)).argmax(dim=1).tolist()  # 0 red, 1 green, 2 blue
    assert colour == [0, 0, 2, 1, 1, 1]
    assert sample["embeds_gen_mask"].tolist() == [False, False, True, False, False, False]
    # spans in the sequence: patch, img (red), img (gen, blue), patch, patch, img (green)
    starts = [t for t in sample["input_ids"].tolist() if t in (ids.patch_start, ids.img_start)]
    assert starts == [ids.patch_start, ids.img_start, ids.img_start, ids.patch_start, ids.patch_start,
                      ids.img_start]
    # the k-th run of 64 cmp positions starts right after the k-th cmp span opener
    cmp_pos = torch.nonzero(sample["ids_cmp_mask"]).flatten().view(-1, N)[:, 0].tolist()
    inp = sample["input_ids"].tolist()
    assert [inp[p - 1] for p in cmp_pos] == [ids.patch_start, ids.img_start, ids.patch_start, ids.patch_start,
                                             ids.img_start]


def test_image_only_document_has_no_ce(tokenizer, ids, images):
    sample = make_builder(tokenizer)(rec(images, [{"role": None, "content": [{"image": "small.png"}]}]))
    assert (sample["labels"] == IGNORE_INDEX).all()
    assert sample["input_ids"][-1].item() == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------- t2i
def test_t2i_flip_is_deterministic_and_about_the_ratio():
    ids_ = [f"pairs/{i}" for i in range(2000)]
    first = [t2i_flip(0, i, 0.3) for i in ids_]
    assert first == [t2i_flip(0, i, 0.3) for i in ids_]
    assert 0.26 < sum(first) / len(first) < 0.34
    assert first != [t2i_flip(1, i, 0.3) for i in ids_]
    assert not any(t2i_flip(0, i, 0.0) for i in ids_[:50]) and all(t2i_flip(0, i, 1.0) for i in ids_[:50])


def test_t2i_ratio_turns_pairs_into_caption_to_image(tokenizer, ids, images):
    pairs = [rec(images, [{"role": None, "content": [{"image": "small.png"}, {"text": "Blue."}]}], rid=f"p/{i}")
             for i in range(12)]
    a = make_builder(tokenizer, t2i_ratio=0.5, seed=3)
    b = make_builder(tokenizer, t2i_ratio=0.5, seed=3)
    flips = [bool(a(r)["embeds_gen_mask"].any()) for r in pairs]
    assert flips == [bool(b(r)["embeds_gen_mask"].any()) for r in pairs]
    assert flips == [t2i_flip(3, r["id"], 0.5) for r in pairs]
    assert 0 < sum(flips) < len(flips)
    flipped = a(pairs[flips.index(True)])
    cap = enc(tokenizer, "Blue.")
    assert flipped["input_ids"].tolist() == ([tokenizer.bos_token_id] + cap + span(ids.img_start, ids.img_end, ids)
                                             + [tokenizer.eos_token_id])
    # the caption is the condition (no CE); only <img> and EOS are targets
    assert flipped["labels"].tolist() == ([IGNORE_INDEX] * (1 + len(cap)) + [ids.img_start]
                                          + [IGNORE_INDEX] * (N + 1) + [tokenizer.eos_token_id])
    # only single-turn [image, text] documents are candidates
    always = make_builder(tokenizer, t2i_ratio=1.0)
    chat = rec(images, [{"role": "user", "content": [{"image": "small.png"}, {"text": "Hi"}]}])
    assert not always(chat)["embeds_gen_mask"].any()
    assert always(pairs[0])["embeds_gen_mask"].all()


def _pair(images, caption="Blue.", rid="p/0"):
    return rec(images, [{"role": None, "content": [{"image": "small.png", "grid": "1x1"}, {"text": caption}]}],
               rid=rid)


def test_t2i_flip_supervises_only_img_and_eos(tokenizer, ids, images):
    """Official SEED-X: caption -> image carries no caption CE. <s> caption(-100) <img>(CE) 64 slots(-100,
    gen mask) </img>(-100) </s>(CE); the default t2i_chat_format (plain) adds no prompt text."""
    sample = make_builder(tokenizer, t2i_ratio=1.0)(_pair(images, "A blue square on white."))
    cap = enc(tokenizer, "A blue square on white.")
    boi = 1 + len(cap)
    assert sample["input_ids"].tolist() == ([tokenizer.bos_token_id] + cap + span(ids.img_start, ids.img_end, ids)
                                            + [tokenizer.eos_token_id])
    assert sample["labels"].tolist() == ([IGNORE_INDEX] * boi + [ids.img_start] + [IGNORE_INDEX] * (N + 1)
                                         + [tokenizer.eos_token_id])
    assert supervised_positions(sample) == [boi, boi + N + 2]
    assert torch.nonzero(sample["ids_gen_mask"]).flatten().tolist() == list(range(boi + 1, boi + 1 + N))
    assert not sample["ids_cmp_mask"].any()
    assert sample["embeds_gen_mask"].tolist() == [True] and sample["vit_pixels"].shape == (1, 3, S, S)
    check_masks(sample, ids)


def test_t2i_chat_format_wraps_only_the_flipped_caption(tokenizer, ids, images):
    llama = make_builder(tokenizer, t2i_ratio=1.0, t2i_chat_format="llama2")
    sample = llama(_pair(images))
    prompt = enc(tokenizer, "[INST] Blue. [/INST]\n")
    assert sample["input_ids"].tolist() == ([tokenizer.bos_token_id] + prompt + span(ids.img_start, ids.img_end, ids)
                                            + [tokenizer.eos_token_id])
    assert supervised_positions(sample) == [1 + len(prompt), len(sample["input_ids"]) - 1]
    # a record's own user turns keep chat_format (llama2) while flipped captions are plain
    plain = make_builder(tokenizer, t2i_ratio=1.0)
    chat = plain(rec(images, [{"role": "user", "content": [{"text": "Hi"}]},
                              {"role": "assistant", "content": [{"text": "Hello"}]}]))
    user, answer = enc(tokenizer, "[INST] Hi [/INST]\n"), enc(tokenizer, "Hello")
    assert chat["input_ids"].tolist() == [tokenizer.bos_token_id] + user + answer + [tokenizer.eos_token_id]
    assert chat["labels"].tolist() == [IGNORE_INDEX] * (1 + len(user)) + answer + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="t2i_chat_format"):
        make_builder(tokenizer, t2i_chat_format="chatml")


def test_t2i_can_be_forced_per_call(tokenizer, ids, images):
    never, always = make_builder(tokenizer, t2i_ratio=0.0), make_builder(tokenizer, t2i_ratio=1.0)
    pair = _pair(images)
    forced = never(pair, t2i=True)
    for key in ("input_ids", "labels", "ids_gen_mask", "ids_cmp_mask", "embeds_gen_mask"):
        assert forced[key].tolist() == always(pair)[key].tolist()
    comprehension = always(pair, t2i=False)
    assert comprehension["embeds_cmp_mask"].tolist() == [True, True]  # 1x1 tile + global view
    assert comprehension["labels"].tolist() == never(pair)["labels"].tolist()
    with pytest.raises(ValueError, match="image-caption pair"):
        never(rec(images, [{"role": None, "content": [{"text": "no image"}]}]), t2i=True)


def test_probe_t2i_sample_is_the_training_flip(tokenizer, ids, images, tmp_path):
    """The MLLM probe's regression sample is laid out like a t2i_ratio sample: caption without CE."""
    from types import SimpleNamespace

    from src.callbacks.mllm_probe import MLLMProbeCallback

    builder = make_builder(tokenizer, t2i_ratio=0.5)
    seen = []
    module = SimpleNamespace(
        training=False, device="cpu", eval=lambda: None, train=lambda mode: None,
        transfer_batch_to_device=lambda batch, device, idx: batch, generate_text=lambda batch, n: [],
        compute_losses=lambda batch, stage: seen.append(batch) or {"loss_mse": torch.tensor(0.0)})
    dm = SimpleNamespace(builder=builder, tokenizer=tokenizer, collator=lambda samples: samples[0])
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=False)
    MLLMProbeCallback(str(tmp_path), 1, str(images / "small.png"), "Blue.").run(trainer, module, step=1)
    (probe,) = seen
    training = make_builder(tokenizer, t2i_ratio=1.0)(rec(images, [{"role": None, "content": [
        {"image": str(images / "small.png")}, {"text": "Blue."}]}]))
    for key in ("input_ids", "labels", "ids_gen_mask", "embeds_gen_mask"):
        assert probe[key].tolist() == training[key].tolist()
    cap = enc(tokenizer, "Blue.")
    assert probe["labels"][1:1 + len(cap)].tolist() == [IGNORE_INDEX] * len(cap)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text", ["look <img> here", "a <loc-12> b", "x</s>", "<s>start", "<box_start>",
                                  "tok <img_00003>", "</patch>"])
def test_special_token_in_text_is_skipped(tokenizer, images, text):
    out = make_builder(tokenizer)(rec(images, [{"role": "user", "content": [{"text": text}]},
                                               {"role": "assistant", "content": [{"text": "ok"}]}]))
    skipped = out["skipped"]
    assert isinstance(skipped, SkippedSample)
    assert skipped.reason == "special_token_in_text" and skipped.id == "t/0" and skipped.source == "t"
    assert "turns[0].content[0].text" in skipped.detail


def test_bad_images_and_boxes_are_skipped_with_reasons(tokenizer, images):
    build = make_builder(tokenizer)
    missing = build(rec(images, [{"role": None, "content": [{"image": "nope.png"}, {"text": "x"}]}]))
    assert missing["skipped"].reason == "missing_file" and missing["skipped"].where == "test:t/0"
    small = build(rec(images, [{"role": None, "content": [{"image": "tiny.png"}, {"text": "x"}]}]))
    assert small["skipped"].reason == "image_too_small"
    box = build(rec(images, [{"role": None, "content": [{"text": "x"}, {"box": [0, 0, 1, 1]}]}]))
    assert box["skipped"].reason == "box_without_image"
    schema = build({"id": "t/1", "source": "t", "turns": []})
    assert schema["skipped"].reason == "bad_schema"
    read_time = SkippedSample("bad_json", "t", None, "f.jsonl:3")
    assert build(read_time) == {"skipped": read_time}


# ------------------------------------------------------------------------------------------- length
def _long_record(images, tokenizer):
    words = " ".join(f"w{i}" for i in range(40))
    return rec(images, [{"role": None, "content": [{"text": words}, {"image": "small.png"}, {"text": words}]}])


def test_too_long_is_cut_without_splitting_an_image(tokenizer, ids, images):
    record = _long_record(images, tokenizer)
    full = make_builder(tokenizer)(record)
    n_text = len(enc(tokenizer, " ".join(f"w{i}" for i in range(40))))
    img_len = 2 * (N + 2)
    end_of_image = 1 + n_text + img_len
    assert len(full["input_ids"]) == end_of_image + n_text + 1

    # cut inside the second text: exactly max_length tokens, no EOS, both views kept
    cut = make_builder(tokenizer, max_length=end_of_image + 5)(record)
    assert cut["truncated"] is True and len(cut["input_ids"]) == end_of_image + 5
    assert cut["input_ids"].tolist() == full["input_ids"][:end_of_image + 5].tolist()
    assert cut["labels"].tolist() == full["labels"][:end_of_image + 5].tolist()
    assert cut["input_ids"][-1].item() != tokenizer.eos_token_id
    assert cut["vit_pixels"].shape[0] == 2
    check_masks(cut, ids)

    # a limit inside a *later* image: cut before that image, its views dropped
    two = rec(images, [{"role": None, "content": [{"image": "small.png"}, {"text": "x y"},
                                                  {"image": "square.png"}, {"text": "z"}]}])
    first_end = 1 + img_len + len(enc(tokenizer, "x y"))
    cut2 = make_builder(tokenizer, max_length=first_end + 70)(two)
    assert cut2["truncated"] and len(cut2["input_ids"]) == first_end
    assert cut2["vit_pixels"].shape[0] == 2
    check_masks(cut2, ids)


def test_too_long_skip_mode_and_first_image_not_fitting(tokenizer, images):
    record = _long_record(images, tokenizer)
    n = len(make_builder(tokenizer)(record)["input_ids"])
    skip = make_builder(tokenizer, max_length=n - 1, truncation="skip")(record)
    assert skip["skipped"].reason == "too_long"
    assert "input_ids" in make_builder(tokenizer, max_length=n, truncation="skip")(record)
    first_image_cut = make_builder(tokenizer, max_length=30)(record)  # the first text alone is > 30 tokens
    assert first_image_cut["skipped"].reason == "too_long"


def test_builder_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="truncation"):
        make_builder(tokenizer, truncation="drop")
    with pytest.raises(ValueError, match="chat_format"):
        make_builder(tokenizer, chat_format="chatml")
    with pytest.raises(ValueError, match="grid"):
        make_builder(tokenizer, grids=["2by2"])
