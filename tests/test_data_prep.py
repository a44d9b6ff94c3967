"""data_prep converters: public layouts (built in tmp dirs from the bundled photos) -> our records.

For every converter: the output passes ``validate_record``, reads back with ``read_jsonl`` / ``read_shards``,
every image loads with ``load_image`` and is byte-identical to its source, boxes are pixels inside their
image, interleaved items keep reading order, and skips are counted per reason exactly (stats, skip log).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data_prep import convert_grit, convert_img2dataset, convert_interleaved, convert_llavar, convert_text
from data_prep.common import ImageBlob, ImageIndex, image_from_bytes
from src.data.records import (
    BadSample,
    SkippedSample,
    load_image,
    read_jsonl,
    read_shards,
    record_images,
    record_text,
    validate_record,
)
from tests.fixtures import data_prep_layouts as layouts
from tests.helpers import run_module_main

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
NAMES = ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "motorcycle", "hubble", "page", "retina"]
BY_BYTES = {layouts.photo(n): n for n in NAMES}


# --------------------------------------------------------------------------------------------- helpers
def image_bytes(record: dict, item: dict) -> bytes:
    if "_blobs" in record:
        return record["_blobs"][item["image"]]
    return (Path(record["_base_dir"]) / item["image"]).read_bytes()


def read_back(stats: dict, extra_images: dict[bytes, str] | None = None) -> list[dict]:
    """Read a converter's output with our readers and check every record, image and box."""
    if stats["format"] == "jsonl":
        assert Path(stats["output"]).suffix == ".jsonl"
        items = list(read_jsonl(stats["output"]))
    else:
        items = list(read_shards(stats["shards"], check_images=True))
    assert not [s for s in items if isinstance(s, SkippedSample)], "converter wrote records our readers reject"
    assert len(items) == stats["records"]
    known = {**BY_BYTES, **(extra_images or {})}
    n_images = 0
    for rec in items:
        validate_record(rec)
        assert rec["id"].startswith(rec["source"] + "/")
        for turn in rec["turns"]:
            size = None
            for item in turn["content"]:
                if "image" in item:
                    im = load_image(rec, item)
                    size = im.size
                    assert image_bytes(rec, item) in known, "image bytes were not copied unchanged"
                    if stats["format"] == "jsonl":
                        assert item["image"].startswith("images/") and not Path(item["image"]).is_absolute()
                elif "box" in item and "canvas" in item:  # a layout box on its own canvas (slides)
                    x0, y0, x1, y1 = item["box"]
                    assert 0 <= x0 <= x1 <= item["canvas"][0] and 0 <= y0 <= y1 <= item["canvas"][1]
                elif "box" in item:
                    assert size is not None, "a box must follow an image"
                    x0, y0, x1, y1 = item["box"]
                    assert 0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]
        n_images += len({image_bytes(rec, i) for i in record_images(rec)})
    assert n_images == stats["images"]
    return items


def layout(rec: dict, names: dict[bytes, str] | None = None) -> list[str]:
    """Content of a one-turn record as photo names (images) and texts."""
    known = {**BY_BYTES, **(names or {})}
    (turn,) = rec["turns"]
    return [known[image_bytes(rec, i)] if "image" in i else i.get("text", "box") for i in turn["content"]]


def check_skips(stats: dict, expected: dict[str, int]) -> list[dict]:
    assert stats["skipped"] == expected
    assert stats["skipped_total"] == sum(expected.values())
    lines = [json.loads(line) for line in Path(stats["skip_log"]).read_text().splitlines()]
    assert Counter(d["reason"] for d in lines) == Counter(expected)
    assert all(d["where"] not in (None, "", "?") and d["source"] == stats["source"] for d in lines)
    return lines


# --------------------------------------------------------------------------------------------- img2dataset
def test_img2dataset_txt_captions_to_jsonl(tmp_path):
    fx = layouts.build_img2dataset(tmp_path / "laion")
    stats = convert_img2dataset.convert(fx["root"], tmp_path / "out", name="laion", quiet=True)
    recs = read_back(stats)
    assert {r["id"] for r in recs} == {f"laion/{k}" for k in fx["good"]}
    for rec in recs:
        name = fx["good"][rec["id"].split("/")[1]]
        assert layout(rec) == [name, f"alt text of {name}"]
        assert rec["url"] == layouts.url_of(name)
        assert rec["turns"][0]["role"] is None
    skips = check_skips(stats, fx["skipped"])
    bad_ids = {d["reason"]: d["id"] for d in skips}
    assert bad_ids["corrupt_image"] == "laion/000010000" and bad_ids["failed_download"] == "laion/000010004"
    assert (tmp_path / "out" / "laion.jsonl").is_file() and not (tmp_path / "out" / "laion.jsonl.tmp").exists()


def _truncated_shard(path: Path) -> None:
    """A third shard cut off in the middle of its second sample's image (an interrupted download)."""
    import tarfile

    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, name in enumerate(["retina", "hubble"]):
            meta = {"url": layouts.url_of(name), "status": "success", "top_caption": f"A photo of {name}."}
            sink.write({"__key__": f"00002000{i}", "jpg": layouts.photo(name), "txt": name.encode(),
                        "json": json.dumps(meta).encode()})
    with tarfile.open(path) as tar:
        cut = tar.getmember("000020001.jpg")
        cut = cut.offset_data + cut.size // 2
    path.write_bytes(path.read_bytes()[:cut])


def test_img2dataset_recaption_field_to_shards(tmp_path):
    fx = layouts.build_img2dataset(tmp_path / "laion_coco")
    _truncated_shard(tmp_path / "laion_coco" / "00002.tar")
    stats = convert_img2dataset.convert(str(tmp_path / "laion_coco" / "{00000..00002}.tar"), tmp_path / "out",
                                        name="laion_coco", caption_field="top_caption", shards=True,
                                        shard_maxcount=2, quiet=True)
    assert len(stats["shards"]) == 3 and all(Path(s).parent.name == "laion_coco" for s in stats["shards"])
    recs = read_back(stats)
    texts = sorted(record_text(r) for r in recs)
    assert texts == sorted(f"A photo of {n}." for n in [*fx["good"].values(), "retina"])
    for rec in recs:
        assert record_images(rec) == [{"image": "jpg"}]
    lines = check_skips(stats, {**fx["skipped"], "bad_shard": 1})
    assert next(d for d in lines if d["reason"] == "bad_shard")["where"].endswith("00002.tar")


def test_img2dataset_nested_and_list_fields():
    assert convert_img2dataset.caption_text(["", "  ", "second"]) == "second"
    sample = {"__key__": "k", "jpg": layouts.photo("coins"),
              "json": json.dumps({"status": "success", "sam": {"recaption": " Coins. "}}).encode()}
    rec = convert_img2dataset.sample_to_record(sample, "sam", caption_field="sam.recaption")
    assert rec["turns"][0]["content"][1] == {"text": "Coins."}
    assert isinstance(rec["turns"][0]["content"][0]["image"], ImageBlob)


# --------------------------------------------------------------------------------------------- interleaved
def test_obelics_parquet_to_jsonl(tmp_path):
    fx = layouts.build_obelics(tmp_path / "obelics")
    stats = convert_interleaved.convert(fx["input"], tmp_path / "out", image_root=fx["images"], quiet=True)
    assert stats["name"] == "obelics"  # detected from the columns
    recs = read_back(stats)
    by_row = {int(r["id"].rsplit("-", 1)[1]): r for r in recs}
    assert sorted(by_row) == sorted(fx["order"])
    for row, expected in fx["order"].items():
        got = layout(by_row[row])
        assert [g if g in NAMES else "text" for g in got] == expected
    assert layout(by_row[0])[::2] == ["Intro paragraph.", "Middle paragraph.", "Closing words."]
    assert by_row[0]["id"] == "obelics/train-00000-of-01335-0000000"
    assert by_row[0]["url"] == "https://example.com/page0"
    check_skips(stats, fx["skipped"])
    assert stats["dropped_images"] == fx["dropped_images"]


def test_obelics_to_shards_keeps_every_image(tmp_path):
    fx = layouts.build_obelics(tmp_path / "obelics")
    stats = convert_interleaved.convert([fx["input"]], tmp_path / "out", image_root=fx["images"],
                                        format="obelics", shards=True, quiet=True)
    recs = read_back(stats)
    first = next(r for r in recs if r["id"].endswith("-0000000"))
    assert [i["image"] for i in record_images(first)] == ["0.jpg", "1.jpg"]
    assert layout(first)[1::2] == ["astronaut", "chelsea"]
    check_skips(stats, fx["skipped"])


def _mmc4_names(fx) -> dict[bytes, str]:
    return {(fx["images"] / "c0ffee.png").read_bytes(): "retina"}


def test_mmc4_zip_images_before_matched_sentence(tmp_path):
    fx = layouts.build_mmc4(tmp_path / "mmc4")
    stats = convert_interleaved.convert(fx["input"], tmp_path / "out", image_root=fx["images"], format="mmc4",
                                        quiet=True)
    recs = read_back(stats, _mmc4_names(fx))
    by_row = {int(r["id"].rsplit("-", 1)[1]): r for r in recs}
    assert sorted(by_row) == sorted(fx["order"])
    for row, expected in fx["order"].items():
        assert layout(by_row[row], _mmc4_names(fx)) == expected
    assert by_row[0]["id"] == "mmc4/docs_shard_0_v2-0000000"
    retina = [i["image"] for i in record_images(by_row[0])][2]
    assert retina.endswith(".png")  # format kept, bytes copied unchanged
    check_skips(stats, fx["skipped"])
    assert stats["dropped_images"] == fx["dropped_images"]


def test_mmc4_skip_documents_with_bad_images(tmp_path):
    fx = layouts.build_mmc4(tmp_path / "mmc4")
    stats = convert_interleaved.convert(fx["input"], tmp_path / "out", image_root=fx["images"],
                                        on_bad_image="skip", quiet=True)
    assert stats["records"] == 2
    skipped = {**fx["skipped"], "missing_file": 1}
    del skipped["too_few_images"]
    check_skips(stats, skipped)


# --------------------------------------------------------------------------------------------- GRIT
def _check_grit(recs: list[dict], fx: dict) -> None:
    by_id = {r["id"]: r for r in recs}
    assert sorted(by_id) == [f"grit/{row['id']}" for row in fx["rows"]]
    for (caption, name, chunks), row in zip(layouts.GRIT_ROWS, fx["rows"]):
        rec = by_id[f"grit/{row['id']}"]
        (turn,) = rec["turns"]
        content = turn["content"]
        assert layout(rec)[0] == name
        w, h = layouts.photo_size(name)  # the stored size, not the row's (original) width/height
        assert (row["width"], row["height"]) == (2 * w, 2 * h)
        # the official grounding form: `phrase [[ <box_start>...<box_end> ]]`; without the markers, the caption
        text = "".join(i["text"] for i in content if "text" in i)
        assert text.replace(convert_grit.BOX_OPEN, "").replace(convert_grit.BOX_CLOSE, "") == caption
        assert text.count(" [[ ") == text.count(" ]]") == len({tuple(c[:2]) for c in chunks})
        boxes = [i for i in content if "box" in i]
        assert len(boxes) == len(chunks)
        for item, (s, e, x0, y0, x1, y1, _) in zip(boxes, sorted(chunks, key=lambda c: c[:2])):
            assert item["label"] == caption[s:e]
            assert item["box"] == pytest.approx([x0 * w, y0 * h, x1 * w, y1 * h], abs=0.01)
        # every box comes right after the text piece that ends with its span and ` [[ `
        for k, item in enumerate(content):
            if "box" in item:
                prev = next(c for c in reversed(content[:k]) if "text" in c)
                assert prev["text"].endswith(item["label"] + " [[ ")
    kinds = [next(k for k in ("image", "text", "box") if k in i) for i in by_id["grit/1001"]["turns"][0]["content"]]
    assert kinds == ["image", "text", "box", "text", "box", "box", "text"]  # "green eyes" has two boxes


def test_grit_parquet_with_img2dataset_download(tmp_path):
    fx = layouts.build_grit(tmp_path / "grit")
    stats = convert_grit.convert(fx["meta"], tmp_path / "out", images=fx["images"], quiet=True)
    _check_grit(read_back(stats), fx)
    check_skips(stats, fx["skipped_meta"])


def test_grit_img2dataset_shards_with_grit_columns(tmp_path):
    fx = layouts.build_grit(tmp_path / "grit")
    stats = convert_grit.convert(fx["shards"], tmp_path / "out", shards=True, quiet=True)
    _check_grit(read_back(stats), fx)
    lines = check_skips(stats, fx["skipped_shards"])
    assert {d["reason"]: d["id"] for d in lines}["corrupt_image"] == "grit/1003"  # GRIT id, not shard key


def test_grit_overlap_score_and_bad_boxes():
    image = image_from_bytes(layouts.photo("page"))  # 320 x 159
    notes = Counter()
    caption = "a page of a book"
    spans = [(0, 6, (0.0, 0.0, 1.0, 1.0), 0.9), (2, 16, (0.1, 0.1, 0.2, 0.2), 0.9),  # overlaps the first
             (10, 16, (0.5, 0.5, 1.0004, 1.0), 0.2), (10, 16, (0.25, 0.5, 0.75, 1.0), 0.8)]
    content = convert_grit.grounded_content(caption, spans, image, min_score=0.5,
                                            note=lambda g, r: notes.update([r]))
    assert content[1:] == [{"text": "a page [[ "}, {"box": [0.0, 0.0, 320.0, 159.0], "label": "a page"},
                           {"text": " ]] of a book [[ "}, {"box": [80.0, 79.5, 240.0, 159.0], "label": "a book"},
                           {"text": " ]]"}]
    assert notes == {"overlapping_span": 1, "low_score": 1}
    with pytest.raises(BadSample) as e:
        convert_grit.grounded_content(caption, [(0, 6, (0.6, 0.0, 0.5, 1.0), 0.9)], image)
    assert e.value.reason == "bad_annotation"
    with pytest.raises(BadSample) as e:
        convert_grit.grounded_content(caption, [(0, 6, (0.1, 0.1, 0.5, 0.5), 0.1)], image, min_score=0.5)
    assert e.value.reason == "no_boxes"


# --------------------------------------------------------------------------------------------- LLaVAR
def test_llavar_conversations(tmp_path):
    fx = layouts.build_llavar(tmp_path / "llavar")
    stats = convert_llavar.convert(fx["input"], tmp_path / "out", image_root=fx["images"], quiet=True)
    recs = {r["id"]: r for r in read_back(stats)}
    assert sorted(recs) == ["llavar/coffee_1", "llavar/page_0", "llavar/page_0-1", "llavar/rocket_2",
                            "llavar/text_5"]

    def shape(rec):
        return [(t["role"], [BY_BYTES[image_bytes(rec, i)] if "image" in i else i["text"] for i in t["content"]])
                for t in rec["turns"]]

    assert shape(recs["llavar/page_0"]) == [
        ("user", ["page", "What is the heading of this page?"]),
        ("assistant", ["The heading reads 'Region-based segmentation'."]),
        ("user", ["What language is the code in?"]), ("assistant", ["Python."])]
    assert shape(recs["llavar/coffee_1"]) == [("user", ["Describe the drink.", "coffee"]),
                                              ("assistant", ["An espresso in a red cup."])]
    assert shape(recs["llavar/rocket_2"])[0] == ("user", ["rocket", "Is there any text on the rocket?"])
    assert record_images(recs["llavar/text_5"]) == []
    check_skips(stats, fx["skipped"])


# --------------------------------------------------------------------------------------------- text
def test_text_corpora(tmp_path):
    fx = layouts.build_text(tmp_path / "text")
    stats = convert_text.convert([fx["txt"], fx["jsonl"]], tmp_path / "out", name="pile", quiet=True)
    recs = read_back(stats)
    assert [record_text(r) for r in recs] == fx["texts"]
    assert [r["id"] for r in recs] == ["pile/corpus-0", "pile/corpus-2", "pile/c4-train-0", "pile/c4-train-4"]
    assert all(r["turns"] == [{"role": None, "content": [{"text": record_text(r)}]}] for r in recs)
    check_skips(stats, fx["skipped"])
    loose = convert_text.convert(fx["txt"], tmp_path / "out2", min_chars=1, quiet=True)
    assert loose["records"] == 3 and loose["skipped_total"] == 0
    c4 = tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz"  # C4's naming: jsonl content, .json.gz
    c4.parent.mkdir(parents=True)
    c4.write_bytes(gzip.compress(fx["jsonl"].read_bytes()))
    gz = convert_text.convert(tmp_path / "c4", tmp_path / "out3", name="c4", quiet=True)  # folder input
    assert gz["records"] == 2 and gz["skipped"] == {"too_short": 1, "bad_json": 1, "missing_text": 1}


# --------------------------------------------------------------------------------------------- shared pieces
def test_image_index_lookups(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "photo.jpg").write_bytes(layouts.photo("coins"))
    index = ImageIndex(root)
    assert index.get(name="sub/photo.jpg").width == 320
    assert index.get(key="photo").height == 252
    with pytest.raises(BadSample) as e:
        index.get(url="https://example.com/a/photo.jpg")
    assert e.value.reason == "missing_file"
    assert ImageIndex(root, url_filename=True).get(url="https://example.com/a/photo.jpg?x=1").width == 320
    with pytest.raises(BadSample) as e:
        image_from_bytes(layouts.photo("corrupt"))
    assert e.value.reason == "corrupt_image"


def test_command_lines(tmp_path, capsys):
    fx = layouts.build_text(tmp_path / "text")
    code, stdout, stderr = run_module_main(convert_text.main, ["--input", str(fx["txt"]), "--out", str(tmp_path / "out"),
                                                              "--min-chars", "10"], capsys)
    assert code == 0, stderr
    assert "wrote 2 records" in stdout and "too_short" in stdout
    assert len((tmp_path / "out" / "text.jsonl").read_text().splitlines()) == 2
    fx = layouts.build_llavar(tmp_path / "llavar")
    stats = convert_llavar.main(["--input", str(fx["input"]), "--image-root", str(fx["images"]),
                                 "--out", str(tmp_path / "out"), "--shards", "--name", "ocr"])
    assert stats["records"] == 5 and len(read_back(stats)) == 5
