"""Instruction-tuning converters: public layouts (built from the bundled photos) -> records that our readers
load, the SFT builder lays out and the collator batches; every bad row skipped and counted with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import convert_edit, convert_llava, convert_slides, convert_vist, convert_viton
from src.data.mllm import load_tokenizer
from src.data.mllm_collate import MLLMCollator
from src.data.mllm_sequence import IGNORE_INDEX, SeedXSequenceBuilder
from src.data.records import load_image, read_jsonl
from tests.fixtures import data_prep_layouts as layouts
from tests.test_data_prep import BY_BYTES, check_skips, image_bytes, read_back

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builder():
    tok = load_tokenizer(str(ROOT / "assets" / "tokenizers" / "tiny-llama"))
    return SeedXSequenceBuilder(tok, vit_image_size=28, chat_format="llama2", max_length=4096)


def batch_of(stats: dict, builder) -> dict:
    """Every converted record through the training builder and collator: none skipped, CE somewhere."""
    samples = [builder(r) for r in read_jsonl(stats["output"])]
    assert not [s["skipped"] for s in samples if "skipped" in s]
    batch = MLLMCollator(builder.tokenizer.pad_token_id, 4096, vit_image_size=28)(samples)
    assert batch["batch_size"] == stats["records"] > 0
    assert bool((batch["labels"] != IGNORE_INDEX).any())
    return batch


def shape(rec: dict, extra: dict[bytes, str] | None = None) -> list[tuple]:
    names = {**BY_BYTES, **(extra or {})}

    def item(i):
        if "image" in i:
            return (names.get(image_bytes(rec, i), "new"), "gen") if i.get("generate") else names[image_bytes(rec, i)]
        return i.get("text", "box")

    return [(t["role"], [item(i) for i in t["content"]]) for t in rec["turns"]]


def test_llava_multi_image_chats_and_placeholder_mismatch_is_skipped_with_its_entry(tmp_path, builder):
    fx = layouts.build_llava_instruct(tmp_path / "llava")
    stats = convert_llava.convert(fx["chat"], tmp_path / "out", image_root=fx["images"], quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert shape(recs["llava/two"]) == [("user", ["rocket", "hubble", "What do the two photos share?"]),
                                        ("assistant", ["Both are about space."])]
    assert [t["role"] for t in recs["llava/cat"]["turns"]] == ["user", "assistant", "user", "assistant"]
    skips = check_skips(stats, fx["chat_skipped"])
    mismatch = next(d for d in skips if d["id"] == "llava/mismatch")
    assert mismatch["where"] == fx["mismatch_where"] and "2 <image> placeholder(s) but 1 image" in mismatch["detail"]
    batch = batch_of(stats, builder)
    assert int(batch["embeds_cmp_mask"].sum()) > 0 and int(batch["embeds_gen_mask"].sum()) == 0


def test_sharegpt4v_captions_become_caption_to_image_requests(tmp_path, builder):
    fx = layouts.build_llava_instruct(tmp_path / "llava")
    stats = convert_llava.convert(fx["captions"], tmp_path / "out", image_root=fx["images"], name="sharegpt4v_t2i",
                                  generation=True, quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert shape(recs["sharegpt4v_t2i/sa_1"]) == [("user", ["An espresso with crema in a red cup on a saucer."]),
                                                  ("assistant", [("coffee", "gen")])]
    check_skips(stats, fx["caption_skipped"])
    batch = batch_of(stats, builder)
    assert int(batch["embeds_gen_mask"].sum()) == 2 and int(batch["ids_gen_mask"].sum()) == 2 * 64


def test_magicbrush_sessions_become_multi_turn_edit_chains(tmp_path, builder):
    fx = layouts.build_magicbrush(tmp_path / "mb")
    stats = convert_edit.convert(fx["input"], tmp_path / "out", format="magicbrush", single_turn=False, quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert set(recs) == set(fx["chains"])
    assert shape(recs["magicbrush/100"]) == [
        ("user", ["chelsea", "make the cat look right"]), ("assistant", [("coffee", "gen")]),
        ("user", ["add a cup"]), ("assistant", [("rocket", "gen")])]
    assert recs["magicbrush/100"]["turns"][0]["content"][0]["grid"] == "1x1"  # official edit input grid
    check_skips(stats, fx["skipped"])
    batch = batch_of(stats, builder)
    # sources: one tile + the global view each; every target one generation view
    assert int(batch["embeds_cmp_mask"].sum()) == 2 * 3 and int(batch["embeds_gen_mask"].sum()) == 2 + 1 + 1
    # the default is the official single-turn recipe: one record per edit, each from the previous result
    single = convert_edit.convert(fx["input"], tmp_path / "single", format="magicbrush", quiet=True)
    singles = {r["id"]: r for r in read_jsonl(single["output"])}
    assert sorted(singles) == ["magicbrush/100-0", "magicbrush/100-1", "magicbrush/200-0", "magicbrush/300-0"]
    assert all(len(r["turns"]) == 2 for r in singles.values())


def test_instructpix2pix_and_seed_data_edit_pairs(tmp_path, builder):
    fx = layouts.build_ip2p(tmp_path / "ip2p")
    stats = convert_edit.convert(fx["input"], tmp_path / "out", format="ip2p", quiet=True)
    (rec,) = read_back(stats)
    assert shape(rec) == [("user", ["chelsea", "make it a dog"]), ("assistant", [("coffee", "gen")])]
    assert rec["original_prompt"] == "a cat"
    check_skips(stats, fx["skipped"])
    batch_of(stats, builder)
    fx = layouts.build_seed_edit(tmp_path / "seed")
    stats = convert_edit.convert(fx["input"], tmp_path / "out2", format="seed_edit", image_root=fx["images"],
                                 single_turn=False, quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    # Part 3's flat rows (source_image, edit_image_k, instruction_k) as one chain with --multi-turn
    assert shape(recs["seed_edit/mt1"]) == [("user", ["rocket", "Show the night sky."]), ("assistant", [("hubble", "gen")]),
                                            ("user", ["Now a cat."]), ("assistant", [("chelsea", "gen")])]
    # the GPT-4V rewrite wins where a row has it: instruction_new, and the response before the image
    assert shape(recs["seed_edit/gpt4v"]) == [("user", ["chelsea", "Make the cat a cup of coffee."]),
                                              ("assistant", ["Here is the cat as coffee.", ("coffee", "gen")])]
    check_skips(stats, fx["skipped"])
    batch_of(stats, builder)
    # and by default one record per step, each from the previous result (the official single-turn recipe)
    stats = convert_edit.convert(fx["input"], tmp_path / "out3", format="seed_edit", image_root=fx["images"], quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert shape(recs["seed_edit/mt1-1"]) == [("user", ["hubble", "Now a cat."]), ("assistant", [("chelsea", "gen")])]


def test_vist_stories_continue_with_text_then_a_generated_image(tmp_path, builder):
    fx = layouts.build_vist(tmp_path / "vist")
    stats = convert_vist.convert(fx["input"], tmp_path / "out", image_root=fx["images"], context=1,
                                 original_text=True, quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert shape(recs["vist/s1"]) == [
        # the prompt follows the context sentence after a space (not "ready.Continue")
        ("user", ["rocket", "The rocket was ready. Continue the story."]),
        ("assistant", ["The astronaut smiled.", ("astronaut", "gen")]),
        ("user", ["Continue the story."]),
        ("assistant", ["Later we saw galaxies.", ("hubble", "gen")])]
    check_skips(stats, fx["skipped"])
    batch_of(stats, builder)
    short = convert_vist.convert(fx["input"], tmp_path / "out2", image_root=fx["images"], context=2, quiet=True)
    assert short["skipped"] == {"too_short": 1, "missing_file": 1}  # s2 has 2 steps, s3 lost a photo


def test_viton_hd_pairs_become_try_on_requests(tmp_path, builder):
    fx = layouts.build_viton(tmp_path / "viton")
    stats = convert_viton.convert(fx["input"], tmp_path / "out", quiet=True)
    (rec,) = read_back(stats)
    person, cloth, target = fx["records"][rec["id"]]
    assert shape(rec) == [("user", [person, cloth, "Dress the person in this garment."]),
                          ("assistant", [(target, "gen")])]
    check_skips(stats, fx["skipped"])
    batch_of(stats, builder)


def test_slides_write_text_layout_boxes_and_pictures(tmp_path, builder):
    fx = layouts.build_slides(tmp_path / "decks")
    stats = convert_slides.convert(fx["input"], tmp_path / "out", quiet=True)
    (rec,) = list(read_jsonl(stats["output"]))  # a cropped picture is new bytes: read_back cannot name it
    assert all(load_image(rec, i).size for t in rec["turns"] for i in t["content"] if "image" in i)
    assert rec["id"] == "slides/d1"
    first = rec["turns"][1]["content"]
    # each element label on its own line (not "...up.title")
    assert [i.get("text") for i in first if "text" in i] == ["Launch\nRockets go up.", "\ntitle", "\npicture"]
    boxes = [i for i in first if "box" in i]
    assert boxes[1] == {"box": [220.0, 80.0, 370.0, 180.0], "canvas": fx["canvas"]}
    assert image_bytes(rec, first[-1]) == layouts.photo("rocket") and first[-1]["generate"]
    cropped = rec["turns"][3]["content"][-1]
    assert cropped["generate"] and image_bytes(rec, cropped) != layouts.photo("chelsea")  # cut from the render
    check_skips(stats, fx["skipped"])
    batch = batch_of(stats, builder)
    tok = builder.tok
    # each layout box is <box_start> 4 loc tokens <box_end>, supervised (the assistant writes the layout)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.box_start]
    assert len(starts) == 3 and all(labels[i:i + 6] == ids[i:i + 6] for i in starts)
    assert json.loads(Path(stats["skip_log"]).read_text().splitlines()[0])["where"].endswith(".json")
