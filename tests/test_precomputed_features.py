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
from src.data.features import FeatureStore, record_path
from src.train import train
from tests.helpers import CONF, tiny_run_cfg

pytestmark = pytest.mark.smoke

MLLM, DETOK = "seedx_pretrain_tiny", "seedx_detok_pretrain_tiny"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("features")
    out = {}
    for exp in (MLLM, DETOK):
        out[exp] = root / exp
        stats = precompute(["--experiment", exp, "--out", str(out[exp]), "--records-per-step", "8"])
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
    shutil.copytree(stores[MLLM], store)
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
