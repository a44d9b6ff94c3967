"""One batch type per family (src/data/batch.py): the collators' dataclasses share their metadata names,
move to a device as Lightning moves them, and FrozenInputs is the one place that tells stored features
from pixels."""

import dataclasses

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning.fabric.utilities.apply_func import move_data_to_device

from src.callbacks.seen_samples import batch_ids
from src.data.batch import Batch, DetokBatch, FrozenInputs, MLLMBatch, batch_meta
from src.data.detok import collate_samples
from src.data.mllm_collate import MLLMCollator
from src.data.records import SkippedSample
from tests.test_mllm_collate import PAD, fake_sample

pytestmark = pytest.mark.unit

META = [f.name for f in dataclasses.fields(Batch)]


def detok_sample(i: int, stored: bool = False) -> dict:
    common = {"id": f"d/{i}", "source": "detok", "original_size": torch.tensor([8, 8]),
              "crop_top_left": torch.tensor([0, 0]), "has_cond": torch.tensor(i % 2 == 0)}
    if stored:
        return {**common, "vit_features": torch.full((4, 6), float(i)), "vae_moments": torch.randn(8, 2, 2),
                "cond_vae_moments": torch.randn(8, 2, 2)}
    return {**common, "vit_pixels": torch.full((3, 4, 4), float(i)), "vae_pixels": torch.rand(3, 8, 8),
            "cond_pixels": torch.rand(3, 8, 8)}


def skipped(i: int) -> dict:
    return {"skipped": SkippedSample("corrupt_image", "s", f"bad/{i}", "f:1")}


def test_families_share_their_metadata_names():
    mllm = MLLMCollator(PAD, 512)([fake_sample(0, [3], ["cmp"]), skipped(1), fake_sample(2, [4], [])])
    detok = collate_samples([detok_sample(0), skipped(1), detok_sample(2)])
    assert isinstance(mllm, MLLMBatch) and isinstance(detok, DetokBatch)
    for batch, ids, source in ((mllm, ["s/0", "s/2"], "fake"), (detok, ["d/0", "d/2"], "detok")):
        assert isinstance(batch, Batch) and all(hasattr(batch, k) for k in META)
        assert batch.ids == ids and batch.sources == [source] * 2 and batch.batch_size == 2
        assert [s.id for s in batch.skipped] == ["bad/1"]
        assert batch_ids(batch) == (ids, ["bad/1"])  # one reader for every family
    assert detok.vit_pixels.shape == (2, 3, 4, 4) and detok.has_cond.tolist() == [True, True]
    # A batch of only bad samples: metadata, no tensors, still the family's type.
    empty = collate_samples([skipped(0)])
    assert isinstance(empty, DetokBatch) and empty.batch_size == 0 and empty.vit_pixels is None
    assert batch_meta({"ids": ["x"], "batch_size": 1}).ids == ["x"]  # a dict from elsewhere still reads


def test_batches_move_to_a_device_as_lightning_moves_them():
    batch = MLLMCollator(PAD, 512, packing=True)([fake_sample(0, [3], ["cmp"]), fake_sample(1, [2], ["gen"])])
    moved = move_data_to_device(batch, torch.device("meta"))
    assert type(moved) is MLLMBatch and moved.input_ids.device.type == "meta"
    assert moved.vit_pixels.device.type == "meta" and moved.ids == batch.ids and moved.attention_mask is None
    assert batch.input_ids.device.type == "cpu"  # a new batch: the loader's one is untouched
    # Dict-style access for code not yet reading attributes (test helpers that inject NaN, ...).
    assert batch["batch_size"] == 2 and "vit_pixels" in batch and "vit_features" not in batch
    batch["vit_pixels"].fill_(float("nan"))
    assert batch.vit_pixels.isnan().all()
    with pytest.raises(KeyError):
        batch["id"]


def test_an_mllm_batch_holds_pixels_or_features_never_both():
    fields = {k: torch.zeros(1) for k in ("input_ids", "labels", "position_ids", "ids_cmp_mask", "ids_gen_mask",
                                          "embeds_cmp_mask", "embeds_gen_mask", "patch_positions")}
    with pytest.raises(ValueError, match="exactly one"):
        MLLMBatch(**fields, attention_mask=None)
    with pytest.raises(ValueError, match="exactly one"):
        MLLMBatch(**fields, attention_mask=None, vit_pixels=torch.zeros(0), vit_features=torch.zeros(0))


def test_frozen_inputs_use_stored_features_or_run_the_tower():
    calls = []

    def vit(pixels):
        calls.append(pixels.shape[0])
        return pixels.flatten(1)[:, :6].unsqueeze(1).repeat(1, 4, 1) * 2

    def vae(pixels):
        return DiagonalGaussianDistribution(torch.cat([pixels[:, :2], torch.zeros_like(pixels[:, :2])], 1))

    inputs = FrozenInputs(vit, vae, dtype=lambda: torch.float64)
    live = collate_samples([detok_sample(1), detok_sample(2)])
    stored = collate_samples([detok_sample(1, stored=True), detok_sample(2, stored=True)])
    assert not live.stored_features and stored.stored_features
    out = inputs.vit(live)
    assert calls == [2] and torch.equal(out, (live.vit_pixels.flatten(1)[:, :6] * 2).unsqueeze(1).repeat(1, 4, 1))
    feats = inputs.vit(stored)
    assert calls == [2] and feats.dtype == torch.float64 and torch.equal(feats, stored.vit_features.double())
    assert torch.equal(inputs.posterior(live).mode(), live.vae_pixels[:, :2])
    assert torch.equal(inputs.posterior(live, cond=True).mode(), live.cond_pixels[:, :2])
    assert torch.equal(inputs.posterior(stored).mode(), stored.vae_moments.chunk(2, dim=1)[0])
    assert torch.equal(inputs.posterior(stored, cond=True).mean, stored.cond_vae_moments.chunk(2, dim=1)[0])
    with pytest.raises(ValueError, match="no VAE"):
        FrozenInputs(vit).posterior(live)


def test_head_keeps_the_first_samples():
    batch = collate_samples([detok_sample(i) for i in range(4)])
    head = batch.head(2)
    assert type(head) is DetokBatch and head.batch_size == 2 and head.ids == ["d/0", "d/1"]
    assert torch.equal(head.vit_pixels, batch.vit_pixels[:2]) and batch.batch_size == 4
