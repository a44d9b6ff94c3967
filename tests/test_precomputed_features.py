"""Precomputed frozen features: data_prep writes them, datamodules read them, training is unchanged.

`data_prep/precompute_features.py` encodes the bundled sample data with the tiny twins' frozen towers;
the tiny MLLM and the tiny de-tokenizer (stage 1) then train a few steps from the same seed with and
without `data.features_dir`, and every per-step loss must agree (the ViT is batched differently in the
two runs, so equality is up to float rounding: 1e-5 relative). Broken, missing and stale entries are
skipped or refused like bad images / bad configs. The MLLM also trains from the store with
`strategy=fsdp2` on 2 processes (and test_rank_divergence checks such steps against an unsharded reference).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from data_prep.precompute_features import main as precompute
from src.data.feature_shards import KEYS, SHARDS
from src.data.features import FORMAT, MANIFEST, FeatureStore, open_writer, record_path
from src.data.records import BadSample
from src.inspect import feature_store_stats
from src.train import train
from tests.helpers import CONF, tiny_run_cfg

pytestmark = pytest.mark.smoke

MLLM, DETOK = "seedx_pretrain_tiny", "seedx_detok_pretrain_tiny"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Both stages' stores in the default layout (MDS shards, src/data/feature_shards.py), and the MLLM's
    also in the per-record ``files`` layout (key ``"files"``)."""
    root = tmp_path_factory.mktemp("features")
    out = {}
    # The MLLM's shards are small (a few records each) so that one can be damaged while the others train.
    for exp, name, layout, shard in ((MLLM, MLLM, "mds", 400_000), (DETOK, DETOK, "mds", 1 << 27),
                                     (MLLM, "files", "files", 0)):
        out[name] = root / name
        stats = precompute(["--experiment", exp, "--out", str(out[name]), "--records-per-step", "8",
                            "--layout", layout, "--shard-bytes", str(shard)])
        # The bundled data holds one corrupt and one missing image per source: stored as skip markers.
        assert stats["counts"]["written"] > 0 and stats["counts"].get("skipped/corrupt_image", 0) >= 1
    return out


def step_losses(out: Path) -> dict[int, dict[str, float]]:
    with open(out / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith(("train/", "data/")) and v}
            for r in rows}


def run_both(exp: str, store: Path, tmp_path: Path, extra: list[str]) -> tuple[dict, dict]:
    common = ["trainer.max_steps=3", "trainer.limit_val_batches=0", "~callbacks.model_checkpoint", *extra]
    train(tiny_run_cfg(exp, tmp_path / "pixels", common))
    train(tiny_run_cfg(exp, tmp_path / "features", [*common, f"data.features_dir={store}"]))
    return step_losses(tmp_path / "pixels"), step_losses(tmp_path / "features")


def assert_same_losses(pixels: dict, features: dict) -> None:
    assert sorted(pixels) == sorted(features) == [0, 1, 2], (pixels, features)
    for step, row in pixels.items():
        assert row.keys() == features[step].keys(), step
        for key, value in row.items():
            assert features[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_mllm_trains_the_same_from_features(stores, tmp_path):
    pixels, features = run_both(MLLM, stores[MLLM], tmp_path, ["callbacks.mllm_probe.every_n_steps=0"])
    assert_same_losses(pixels, features)
    assert any(v.get("train/loss_mse", 0) > 0 for v in features.values())  # generated images were in it
    # The probe at the end of fit encodes its own image (not in the store) with the ViT: still works.
    probe = json.loads((tmp_path / "features" / "samples" / "probe.jsonl").read_text().splitlines()[-1])
    assert "caption" in probe and "probe_mse" in probe


def test_detok_stage1_trains_the_same_from_features(stores, tmp_path):
    pixels, features = run_both(DETOK, stores[DETOK], tmp_path, ["callbacks.sample_images.every_n_steps=0"])
    assert_same_losses(pixels, features)
    # The sample grid (end of fit) shows the VAE reconstruction of the stored latents as the original.
    assert list((tmp_path / "features" / "samples").glob("step_*.png"))


def test_broken_missing_and_stale_entries(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores["files"], store)
    cfg = tiny_run_cfg(MLLM, tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data, features_dir=str(store))
    dm.setup("fit")
    records = [r for r in dm.train_set.datasets[0].records if isinstance(r, dict)]
    good = [r for r in records if "skipped" not in dm.builder(dict(r))]
    missing, broken = good[0], good[1]
    record_path(store, missing["source"], missing["id"]).unlink()
    path = record_path(store, broken["source"], broken["id"])
    path.write_bytes(path.read_bytes()[:100])  # truncated
    build = dm.dataset_builder
    assert build(dict(missing))["skipped"].reason == "missing_features"
    assert build(dict(broken))["skipped"].reason == "bad_features"
    # Samples from the store match the pixel builder's layout; a text-only record needs no entry.
    sample = build(dict(good[2]))
    assert sample["vit_features"].shape[1:] == (256, 64) and "vit_pixels" not in sample
    assert torch.equal(sample["input_ids"], dm.builder(dict(good[2]))["input_ids"])
    text = {"id": "t/1", "source": "t", "turns": [{"role": None, "content": [{"text": "No image here."}]}]}
    assert build(text)["vit_features"].shape == (0, 256, 64)
    batch = dm.collator([build(dict(missing))])  # an all-bad batch keeps the feature layout
    assert batch["batch_size"] == 0 and batch["vit_features"].shape == (0, 256, 64)
    # A store written for other views (grids) is refused at setup, naming the key.
    with pytest.raises(ValueError, match="features_dir"):
        FeatureStore(store, expect={"kind": "mllm", "vit_image_size": 56, "grids": ["1x1"]})
    with pytest.raises(Exception, match="features_dir"):  # hydra wraps the ValueError
        hydra.utils.instantiate(tiny_run_cfg(DETOK, tmp_path / "d").data, features_dir=str(store))


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_mllm_trains_from_features_on_two_fsdp2_processes(stores, tmp_path):
    out = tmp_path / "fsdp2"
    cmd = [sys.executable, "-m", "src.train", f"experiment={MLLM}", f"paths.output_dir={out}", "logger=csv",
           "strategy=fsdp2", "strategy.fsdp2.param_dtype=null", "~callbacks.progress_bar", "trainer.devices=2",
           "trainer.max_steps=2", "trainer.limit_val_batches=0", "~callbacks.model_checkpoint",
           "callbacks.mllm_probe.every_n_steps=0", f"data.features_dir={stores[MLLM]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CONF.parent, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/loss_mse"])
    assert sorted(step_losses(out)) == [0, 1]


# ---- the store in MDS shards (src/data/feature_shards.py) ------------------------------------------------
def _mllm_records(cfg, store: Path):
    dm = hydra.utils.instantiate(cfg.data, features_dir=str(store))
    dm.setup("fit")
    return dm, [r for r in dm.train_set.datasets[0].records if isinstance(r, dict)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_shard_store_round_trip_by_id(tmp_path, dtype):
    """Entries written to shards (several parts, several shards each) read back by id, equal to what was
    written up to the stored dtype's precision; skip markers and unknown ids read as skips."""
    torch.manual_seed(0)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "layout": "mds", "tokens": 4, "dim": 8,
                                                 "dtype": dtype}))
    written = {}
    for part in range(2):
        writer = open_writer(tmp_path, "mds", part, 2, shard_bytes=1500)
        for n in range(6):
            rid = f"r{part}-{n}"
            t = {"cmp.0": torch.randn(2, 4, 8), "gen.1": torch.randn(4, 8) * 100}
            writer.write("src", rid, {k: v.to(getattr(torch, dtype)) for k, v in t.items()}, [{"size": [5, 7]}] * 2)
            written[rid] = t
        writer.write("src", f"bad{part}", {}, [], skipped={"reason": "corrupt_image", "detail": "x.jpg"})
        writer.close()
    assert len(list((tmp_path / SHARDS).glob("part-*/shard.*.mds"))) > 2
    store = FeatureStore(tmp_path)
    tol = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    for rid, t in reversed(written.items()):  # any order: by id, not by position
        entry = store.load({"source": "src", "id": rid})
        assert entry.size(1) == (5, 7)
        got = {"cmp.0": entry.cmp(0, 2), "gen.1": entry.gen(1)}
        for k, v in t.items():
            assert got[k].dtype == getattr(torch, dtype)
            assert torch.allclose(got[k].float(), v, rtol=tol, atol=0), (rid, k)
    with pytest.raises(BadSample) as e:
        store.load({"source": "src", "id": "bad1"})
    assert e.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as e:
        store.load({"source": "src", "id": "nowhere"})
    assert e.value.reason == "missing_features" and "src/nowhere" in e.value.detail
    stats = store.stats()
    assert stats["entries"] == 14 and stats["bytes_per_sample"] > 0 and stats["dtype"] == dtype


def test_shard_and_file_layouts_hold_the_same_entries(stores, tmp_path):
    mds, files = FeatureStore(stores[MLLM]), FeatureStore(stores["files"])
    assert mds.layout == "mds" and files.layout == "files"
    _, records = _mllm_records(tiny_run_cfg(MLLM, tmp_path / "run"), stores[MLLM])
    compared = 0
    for r in records:
        try:
            a = files.load(r)
        except BadSample as e:
            with pytest.raises(BadSample) as e2:
                mds.load(r)
            assert e2.value.reason == e.reason
            continue
        b = mds.load(r)
        assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        compared += 1
    assert compared >= 5
    # the same bytes per entry either way (the shard index and json column cost about what file headers do)
    assert mds.stats()["bytes_per_sample"] == pytest.approx(files.stats()["bytes_per_sample"], rel=0.02)
    # src.inspect reports it for the configured store
    cfg = tiny_run_cfg(MLLM, tmp_path / "inspect", [f"data.features_dir={stores[MLLM]}"])
    assert feature_store_stats(cfg) == mds.stats()
    assert feature_store_stats(tiny_run_cfg(MLLM, tmp_path / "none")) is None


def test_damaged_shards_and_unknown_ids_are_counted_skips(stores, tmp_path):
    """A truncated shard, a deleted shard and an unreadable keys file each make their entries skips that
    name the shard or part; the run trains on the rest and counts them."""
    store = tmp_path / "store"
    shutil.copytree(stores[MLLM], store)
    part = next((store / SHARDS).glob("part-*"))
    shards = sorted(part.glob("shard.*.mds"))
    assert len(shards) >= 3, shards
    shards[0].write_bytes(shards[0].read_bytes()[:50])  # truncated
    shards[1].unlink()  # gone
    cfg = tiny_run_cfg(MLLM, tmp_path / "run")
    dm, records = _mllm_records(cfg, store)
    reasons = {}
    for r in records:
        out = dm.dataset_builder(dict(r))
        if "skipped" in out:
            reasons.setdefault(out["skipped"].reason, []).append(out["skipped"].detail)
    assert any(shards[0].name in d for d in reasons["bad_features"])
    assert any(shards[1].name in d for d in reasons["bad_features"])
    unknown = {**records[0], "id": "not-in-store"}
    assert dm.dataset_builder(unknown)["skipped"].reason == "missing_features"
    # Training goes on over the damaged store and names every bad entry in bad_samples.jsonl.
    out = tmp_path / "train"
    train(tiny_run_cfg(MLLM, out, ["trainer.max_steps=2", "trainer.limit_val_batches=0",
                                   "~callbacks.model_checkpoint", "callbacks.mllm_probe.every_n_steps=0",
                                   f"data.features_dir={store}"]))
    bad = [json.loads(line) for line in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert any(b["reason"] == "bad_features" and shards[0].name in b.get("detail", "") for b in bad), bad
    # A part whose keys file is unreadable: named by the store, its records read as missing.
    (part / KEYS).write_text("{not json")
    damaged = FeatureStore(store)
    assert damaged.stats()["problems"] and part.name in damaged.stats()["problems"][0]
    with pytest.raises(BadSample) as e:
        damaged.load(records[-1])
    assert e.value.reason == "missing_features" and part.name in e.value.detail
