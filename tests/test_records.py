"""Record schema, readers (jsonl, folder, webdataset shards), image loading and skip counting."""
import copy
import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from src.data.records import (
    BadSample,
    SkipCounter,
    SkippedSample,
    load_image,
    read_image_folder,
    read_jsonl,
    read_shards,
    record_images,
    record_text,
    validate_record,
)

pytestmark = pytest.mark.unit

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample"
SHARD = SAMPLE / "shards" / "captions-000000.tar"

GOOD = {"id": "t/1", "source": "t", "turns": [
    {"role": "user", "content": [{"image": "a.jpg"}, {"text": "What is this?"}]},
    {"role": "assistant", "content": [{"text": "A cat."}, {"box": [1, 2, 30, 40], "label": "cat"},
                                      {"image": "b.jpg", "generate": True, "grid": "any"}]}]}


def _split(items):
    items = list(items)
    return ([x for x in items if isinstance(x, dict)], [x for x in items if isinstance(x, SkippedSample)])


def _jpeg(size=(32, 24), color=(200, 30, 30), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- schema
def test_validate_accepts_good_record_and_helpers():
    rec = copy.deepcopy(GOOD)
    assert validate_record(rec) is rec
    assert [i["image"] for i in record_images(rec)] == ["a.jpg", "b.jpg"]
    assert record_text(rec) == "What is this?\nA cat."
    doc = {"id": "d", "source": "s", "turns": [{"role": None, "content": [{"text": "x"}]}], "_where": "f:1"}
    validate_record(doc)


@pytest.mark.parametrize("mutate, reason, words", [
    (lambda r: r.pop("id"), "bad_schema", ["missing 'id'"]),
    (lambda r: r.update(source=""), "bad_schema", ["'source'"]),
    (lambda r: r.update(turns=[]), "bad_schema", ["'turns'", "non-empty list"]),
    (lambda r: r.pop("turns"), "bad_schema", ["missing 'turns'"]),
    (lambda r: r["turns"][1].update(role="bot"), "bad_schema", ["turns[1].role", "'bot'"]),
    (lambda r: r["turns"][0].update(content=[]), "bad_schema", ["turns[0].content"]),
    (lambda r: r["turns"][0]["content"][0].update(text="hi"), "bad_schema",
     ["turns[0].content[0]", "exactly one of"]),
    (lambda r: r["turns"][0]["content"].append({"label": "x"}), "bad_schema",
     ["turns[0].content[2]", "exactly one of"]),
    (lambda r: r["turns"][0]["content"][1].update(text=3), "bad_schema", ["turns[0].content[1].text"]),
    (lambda r: r["turns"][0]["content"][1].update(text="  \n"), "empty_text", ["turns[0].content[1].text"]),
    (lambda r: r["turns"][1]["content"][1].update(box=[1, 2, 3]), "bad_schema", ["turns[1].content[1].box"]),
    (lambda r: r["turns"][1]["content"][1].update(box=[10, 2, 3, 40]), "bad_schema", ["x0 <= x1"]),
    (lambda r: r["turns"][1]["content"][2].update(generate="yes"), "bad_schema", ["generate"]),
    (lambda r: r["turns"][1]["content"][2].update(grid="big"), "bad_schema", ["grid"]),
    (lambda r: r["turns"][1]["content"][2].update(image=""), "bad_schema", ["turns[1].content[2].image"]),
])
def test_validate_names_the_problem(mutate, reason, words):
    rec = copy.deepcopy(GOOD)
    mutate(rec)
    with pytest.raises(BadSample) as ei:
        validate_record(rec)
    assert ei.value.reason == reason
    for w in words:
        assert w in ei.value.detail, (w, ei.value.detail)


def test_validate_rejects_non_object():
    with pytest.raises(BadSample, match="JSON object") as ei:
        validate_record([1, 2])
    assert ei.value.reason == "bad_schema"


def test_bad_sample_pickles():
    e = pickle.loads(pickle.dumps(BadSample("corrupt_image", "x.jpg: truncated", source="s", id="s/1",
                                            where="f:3")))
    assert (e.reason, e.detail, e.source, e.id, e.where) == ("corrupt_image", "x.jpg: truncated", "s", "s/1",
                                                             "f:3")


# ------------------------------------------------------------------------------------------- jsonl
def test_read_jsonl_skips_bad_lines_and_keeps_going(tmp_path):
    lines = [
        json.dumps({"id": "c/1", "source": "c", "turns": [{"role": None, "content": [
            {"image": "images/a.jpg"}, {"text": "A red square."}]}]}),
        '{"id": "c/2", "source": "c", "turns": [',  # malformed JSON
        json.dumps({"id": "c/3", "source": "c", "turns": [{"role": None, "content": [
            {"image": "images/a.jpg", "text": "both"}]}]}),  # bad schema
        "",  # blank lines are ignored, not counted
        json.dumps({"id": "c/5", "source": "c", "turns": [{"role": None, "content": [
            {"image": "images/a.jpg"}, {"text": "   "}]}]}),  # empty caption
        json.dumps({"id": "c/6", "turns": [{"role": None, "content": [{"text": "no source given"}]}]}),
        "[1, 2, 3]",
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, skipped = _split(read_jsonl(path, source="fallback"))

    assert [r["id"] for r in records] == ["c/1", "c/6"]
    assert records[1]["source"] == "fallback"  # fills in a missing source
    assert records[0]["_where"] == f"{path}:1" and records[1]["_where"] == f"{path}:6"
    assert records[0]["_base_dir"] == str(tmp_path.resolve())

    got = [(s.reason, s.where, s.id, s.source) for s in skipped]
    assert got == [
        ("bad_json", f"{path}:2", None, "fallback"),
        ("bad_schema", f"{path}:3", "c/3", "c"),
        ("empty_text", f"{path}:5", "c/5", "c"),
        ("bad_schema", f"{path}:7", None, "fallback"),
    ]
    assert "exactly one of" in skipped[1].detail
    assert skipped[0].to_dict()["reason"] == "bad_json"


def test_read_jsonl_source_defaults_to_file_stem(tmp_path):
    path = tmp_path / "laion.jsonl"
    path.write_bytes(b'{"id": 1}\n\xff\xfe\n')
    skipped = list(read_jsonl(path))
    assert [(s.reason, s.source, s.where) for s in skipped] == [
        ("bad_schema", "laion", f"{path}:1"), ("bad_json", "laion", f"{path}:2")]


def test_read_jsonl_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_read_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").write_bytes(_jpeg(fmt="PNG"))
    (tmp_path / "sub" / "a.JPG").write_bytes(_jpeg())
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.jpg").write_bytes(b"macos resource fork")
    records = list(read_image_folder(tmp_path, source="folder"))
    assert [r["id"] for r in records] == ["folder/a.jpg", "folder/b.png", "folder/sub/a.JPG"]
    for r in records:
        validate_record(r)
        assert r["turns"] == [{"role": None, "content": [{"image": r["id"].split("/", 1)[1]}]}]
        assert load_image(r, record_images(r)[0]).size == (32, 24)


# ------------------------------------------------------------------------------------------- images
def _reason(fn):
    with pytest.raises(BadSample) as ei:
        fn()
    return ei.value


def test_load_image_reasons(tmp_path):
    rec = {"id": "s/x", "source": "s", "_base_dir": str(SAMPLE), "_where": "f:1"}
    good = load_image(rec, {"image": "images/chelsea.jpg"})
    assert good.mode == "RGB" and good.size == (320, 213)

    e = _reason(lambda: load_image(rec, {"image": "images/corrupt.jpg"}))
    assert e.reason == "corrupt_image" and "corrupt.jpg" in e.detail and (e.id, e.where) == ("s/x", "f:1")
    assert _reason(lambda: load_image(rec, {"image": "images/missing.jpg"})).reason == "missing_file"
    assert _reason(lambda: load_image(rec, {"image": "images"})).reason == "missing_file"  # a folder

    (tmp_path / "tiny.png").write_bytes(_jpeg((4, 4), fmt="PNG"))
    (tmp_path / "wide.png").write_bytes(_jpeg((200, 20), fmt="PNG"))
    (tmp_path / "text.jpg").write_text("this is not an image")
    rec = {"id": "t", "source": "t", "_base_dir": str(tmp_path)}
    assert load_image(rec, {"image": "tiny.png"}).size == (4, 4)  # default min_size=1
    assert _reason(lambda: load_image(rec, {"image": "tiny.png"}, min_size=8)).reason == "image_too_small"
    assert _reason(lambda: load_image(rec, {"image": "wide.png"}, max_aspect_ratio=4)).reason == "bad_aspect_ratio"
    assert load_image(rec, {"image": "wide.png"}, max_aspect_ratio=10).size == (200, 20)  # 10:1 is allowed
    assert _reason(lambda: load_image(rec, {"image": "text.jpg"})).reason == "corrupt_image"
    # absolute paths are used as they are
    assert load_image({}, {"image": str(tmp_path / "wide.png")}).size == (200, 20)


def test_load_image_converts_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    rec = {"_base_dir": str(tmp_path)}
    assert load_image(rec, {"image": "rgba.png"}).getpixel((0, 0)) == (255, 255, 255)
    grey = load_image(rec, {"image": "grey.png"})
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (77, 77, 77)


def test_load_image_from_blobs():
    rec = {"id": "s/1", "source": "s", "_blobs": {"jpg": _jpeg(), "src.png": _jpeg(fmt="PNG")}}
    assert load_image(rec, {"image": "jpg"}).size == (32, 24)
    assert load_image(rec, {"image": "src.png"}).mode == "RGB"
    assert _reason(lambda: load_image(rec, {"image": "tgt.jpg"})).reason == "missing_file"
    rec["_blobs"]["jpg"] = rec["_blobs"]["jpg"][:100]
    assert _reason(lambda: load_image(rec, {"image": "jpg"})).reason == "corrupt_image"


# ------------------------------------------------------------------------------------------- shards
def test_read_shards_bundled_sample():
    records, skipped = _split(read_shards(str(SHARD)))
    assert len(records) == 10
    assert [(s.reason, s.id, s.source, s.where) for s in skipped] == [
        ("corrupt_image", "sample_captions/corrupt", "sample_captions", f"{SHARD}:corrupt")]
    for r in records:
        assert set(r["_blobs"]) == {"jpg"} and r["_where"].startswith(f"{SHARD}:")
        img = load_image(r, record_images(r)[0])
        assert img.mode == "RGB" and max(img.size) == 320
        assert record_text(r)


def test_read_shards_without_image_check_defers_to_load_image():
    records = list(read_shards([str(SHARD)], check_images=False))
    assert len(records) == 11 and all(isinstance(r, dict) for r in records)
    bad = next(r for r in records if r["id"] == "sample_captions/corrupt")
    assert _reason(lambda: load_image(bad, record_images(bad)[0])).reason == "corrupt_image"


def test_read_shards_shuffle_is_deterministic():
    ids = [r["id"] for r in read_shards(str(SHARD), shuffle=True, seed=3) if isinstance(r, dict)]
    ids2 = [r["id"] for r in read_shards(str(SHARD), shuffle=True, seed=3) if isinstance(r, dict)]
    assert ids == ids2 and len(ids) == 10


def _record(i, *images, text="a caption"):
    content = [{"image": ext} for ext in images] + [{"text": text}]
    return json.dumps({"id": f"w/{i}", "source": "w", "turns": [{"role": None, "content": content}]}).encode()


def test_read_shards_reports_every_kind_of_broken_sample(tmp_path):
    import webdataset as wds

    url = str(tmp_path / "mixed-000000.tar")
    with wds.TarWriter(url, encoder=False) as sink:
        sink.write({"__key__": "s0", "json": _record(0, "jpg"), "jpg": _jpeg()})                 # good
        sink.write({"__key__": "s1", "jpg": _jpeg()})                                             # no json
        sink.write({"__key__": "s2", "json": b"{not json", "jpg": _jpeg()})                      # bad json
        sink.write({"__key__": "s3", "json": _record(3, "jpg", text=" "), "jpg": _jpeg()})      # empty text
        sink.write({"__key__": "s4", "json": _record(4, "png"), "jpg": _jpeg()})                 # no member
        sink.write({"__key__": "s5", "json": _record(5, "src.jpg", "tgt.jpg"),                   # good, 2 imgs
                    "src.jpg": _jpeg(), "tgt.jpg": _jpeg((16, 16))})
        sink.write({"__key__": "s6", "json": _record(6, "jpg"), "jpg": _jpeg((64, 4))})          # 16:1
    # a truncated shard: the first sample survives, the rest is reported as a bad shard
    whole = tmp_path / "whole.tar"
    with wds.TarWriter(str(whole), encoder=False) as sink:
        sink.write({"__key__": "t0", "json": _record(10, "jpg"), "jpg": _jpeg()})
        sink.write({"__key__": "t1", "json": _record(11, "jpg"), "jpg": _jpeg((300, 300))})
    with tarfile.open(whole) as tf:
        t1 = tf.getmember("t1.jpg")
    cut = tmp_path / "mixed-000001.tar"
    cut.write_bytes(whole.read_bytes()[: t1.offset_data + t1.size // 2])  # cut inside t1.jpg

    urls = [url, str(cut), str(tmp_path / "absent.tar")]
    records, skipped = _split(read_shards(urls, source="web", max_aspect_ratio=8))
    assert [r["id"] for r in records] == ["w/0", "w/5", "w/10"]
    assert set(records[1]["_blobs"]) == {"src.jpg", "tgt.jpg"}
    reasons = [(s.reason, s.where.rsplit("/", 1)[-1]) for s in skipped]
    assert reasons[:6] == [("missing_json", "mixed-000000.tar:s1"), ("bad_json", "mixed-000000.tar:s2"),
                           ("empty_text", "mixed-000000.tar:s3"), ("missing_file", "mixed-000000.tar:s4"),
                           ("bad_aspect_ratio", "mixed-000000.tar:s6"), ("bad_shard", "mixed-000001.tar")]
    assert reasons[6:] == [("bad_shard", "absent.tar")]  # one report per broken shard, not one per stage
    assert "unexpected end of data" in skipped[5].detail and "No such file" in skipped[6].detail
    assert skipped[0].source == "web" and skipped[2].id == "w/3"
    counter = SkipCounter()
    for s in skipped:
        counter.add(s)
    assert counter.to_metrics() == {
        "data/skipped/bad_aspect_ratio": 1, "data/skipped/bad_json": 1, "data/skipped/bad_shard": 2,
        "data/skipped/empty_text": 1, "data/skipped/missing_file": 1, "data/skipped/missing_json": 1,
        "data/skipped/total": 7}


def test_read_shards_names_source_after_shard_when_unknown(tmp_path):
    (skipped,) = list(read_shards(str(tmp_path / "laion-000007.tar")))
    assert (skipped.reason, skipped.source) == ("bad_shard", "laion")


# ------------------------------------------------------------------------------------------- counting
def test_skip_counter_counts_merges_and_pickles():
    a, b = SkipCounter(), SkipCounter(max_examples=1)
    a.add(SkippedSample("corrupt_image", "laion", "laion/1", "x.tar:1", "truncated"))
    a.add(SkippedSample("corrupt_image", "coco", "coco/7", "c.jsonl:7"))
    a.add(SkippedSample("bad_json", "coco", None, "c.jsonl:9"))
    b.add(SkippedSample("missing_file", "laion", "laion/2", "x.tar:2"))
    b.add(SkippedSample("corrupt_image", "laion", "laion/3", "x.tar:3"))
    assert b.total == 2 and len(b.examples) == 1

    a.merge(pickle.loads(pickle.dumps(b)))
    assert a.total == 5
    assert a.counts_by_reason() == {"bad_json": 1, "corrupt_image": 3, "missing_file": 1}
    assert a.counts_by_source() == {"coco": 2, "laion": 3}
    assert a.counts() == {"coco": {"bad_json": 1, "corrupt_image": 1},
                          "laion": {"corrupt_image": 2, "missing_file": 1}}
    assert a.to_metrics() == {"data/skipped/bad_json": 1, "data/skipped/corrupt_image": 3,
                              "data/skipped/missing_file": 1, "data/skipped/total": 5}
    assert SkipCounter().to_metrics(prefix="val/skipped") == {"val/skipped/total": 0}
    assert len(a.examples) == 4


def test_skip_counter_logs_first_skips_with_source(caplog):
    c = SkipCounter(log_first=2)
    with caplog.at_level("WARNING", logger="src.data.records"):
        for i in range(5):
            c.add(SkippedSample("corrupt_image", "laion", f"laion/{i}", f"x.tar:{i}", "truncated"))
    assert len(caplog.records) == 2
    assert "laion/0" in caplog.text and "x.tar:0" in caplog.text and "corrupt_image" in caplog.text


def test_read_shards_through_dataloader_workers():
    from torch.utils.data import DataLoader

    loader = DataLoader(read_shards(str(SHARD)), batch_size=None, num_workers=2, collate_fn=lambda x: x)
    records, skipped = _split(loader)
    assert len(records) == 10 and [s.reason for s in skipped] == ["corrupt_image"]
