"""The bundled sample data (assets/sample) is reproducible and holds exactly the documented good/bad entries."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.make_sample_data import build_sample_data
from src.data.records import (
    BadSample,
    SkipCounter,
    SkippedSample,
    load_image,
    read_jsonl,
    read_shards,
    record_images,
    record_text,
)

pytestmark = pytest.mark.unit

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    build_sample_data(out)
    return out


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_rebuild_is_identical_to_committed_assets(rebuilt):
    assert _files(rebuilt) == _files(SAMPLE)
    for name in ["captions.jsonl", "images_only.jsonl", "edit.jsonl", "README.md"]:
        assert (rebuilt / name).read_text() == (SAMPLE / name).read_text(), name
    shard = "shards/captions-000000.tar"
    assert _shard_json(rebuilt / shard) == _shard_json(SAMPLE / shard)
    build_sample_data(rebuilt)  # idempotent: running again changes nothing
    assert _files(rebuilt) == _files(SAMPLE)
    assert (rebuilt / "captions.jsonl").read_text() == (SAMPLE / "captions.jsonl").read_text()


def _shard_json(path: Path) -> dict:
    return {r["_where"].rsplit(":", 1)[1]: json.dumps({k: v for k, v in r.items() if not k.startswith("_")})
            for r in read_shards(str(path), check_images=False)}


def test_sample_data_is_small():
    assert sum((SAMPLE / f).stat().st_size for f in _files(SAMPLE)) < 1.5e6


def _load_all(name: str):
    """(records, counter of load failures) for a sample jsonl; read skips are also counted."""
    counter, ok = SkipCounter(), []
    for rec in read_jsonl(SAMPLE / name):
        if isinstance(rec, SkippedSample):
            counter.add(rec)
            continue
        try:
            images = [load_image(rec, item, min_size=16) for item in record_images(rec)]
        except BadSample as e:
            counter.add(e.to_skipped())
            continue
        ok.append((rec, images))
    return ok, counter


@pytest.mark.parametrize("name, n_good, bad", [
    ("captions.jsonl", 10, {"corrupt_image": 1, "missing_file": 1}),
    ("images_only.jsonl", 10, {"corrupt_image": 1, "missing_file": 1}),
    ("edit.jsonl", 8, {}),
])
def test_jsonl_good_records_load_and_bad_ones_are_exactly_as_documented(name, n_good, bad):
    ok, counter = _load_all(name)
    assert len(ok) == n_good
    assert counter.counts_by_reason() == bad and counter.total == sum(bad.values())
    for rec, images in ok:
        assert all(im.mode == "RGB" and max(im.size) == 320 for im in images)
        assert rec["id"].split("/")[-1] not in {"corrupt", "missing"}
    if bad:
        where = {s.reason: s.where for s in counter.examples}
        assert where["corrupt_image"].endswith(f"{name}:4") and where["missing_file"].endswith(f"{name}:9")
    if name == "captions.jsonl":
        assert all(len(record_text(rec)) > 20 for rec, _ in ok)


def test_shard_matches_readme():
    records, skipped = [], []
    for x in read_shards(str(SAMPLE / "shards" / "captions-000000.tar")):
        (skipped if isinstance(x, SkippedSample) else records).append(x)
    assert len(records) == 10 and [(s.reason, s.id) for s in skipped] == [
        ("corrupt_image", "sample_captions/corrupt")]
    by_id = {json.loads(line)["id"]: json.loads(line) for line in (SAMPLE / "captions.jsonl").open()}
    for r in records:
        assert record_text(r) == record_text(by_id[r["id"]])


def test_edit_targets_are_the_described_transforms():
    edits = {r["id"].split("/")[1]: r for r in read_jsonl(SAMPLE / "edit.jsonl")}
    assert all(r["turns"][0]["role"] == "user" and r["turns"][1]["role"] == "assistant"
               and r["turns"][1]["content"][0]["generate"] is True for r in edits.values())

    def pair(key):
        src, tgt = (np.asarray(load_image(edits[key], item), dtype=np.float32)
                    for item in record_images(edits[key]))
        return src, tgt

    src, tgt = pair("chelsea_flip")
    assert np.abs(src[:, ::-1] - tgt).mean() < 4 < np.abs(src - tgt).mean()
    src, tgt = pair("coins_rotate")
    assert tgt.shape == (src.shape[1], src.shape[0], 3) and np.abs(np.rot90(src, k=-1) - tgt).mean() < 4
    _, tgt = pair("coffee_greyscale")
    assert np.abs(tgt[..., 0] - tgt[..., 2]).mean() < 2
    src, tgt = pair("rocket_brighter")
    assert tgt.mean() > src.mean() * 1.3
    src, tgt = pair("retina_darker")
    assert tgt.mean() < src.mean() * 0.7
    src, tgt = pair("camera_blur")
    assert np.abs(np.diff(tgt, axis=1)).mean() < 0.6 * np.abs(np.diff(src, axis=1)).mean()
    src, tgt = pair("motorcycle_red_to_blue")

    def red(a):  # share of clearly red pixels
        return ((a[..., 0] > 120) & (a[..., 0] > 2 * a[..., 2]) & (a[..., 0] > 2 * a[..., 1])).mean()

    assert red(src) > 0.03 and red(tgt) < red(src) / 4
    src, tgt = pair("astronaut_zoom")  # 2x zoom: the centre half of the source fills the target
    h, w = src.shape[:2]
    centre = src[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2]
    assert tgt.shape == src.shape
    assert np.abs(tgt[::2, ::2] - centre).mean() < 10 < np.abs(tgt[::2, ::2] - src[::2, ::2]).mean()
