"""De-tokenizer stages, step by step on the tiny twins (no trainer): per-rank noise streams, fp32 latents
under bf16 autocast, InstructPix2Pix dropout, the official negative, gradient checkpointing, bf16 towers."""

from __future__ import annotations

import types

import hydra
import pytest
import torch

from data_prep.precompute_features import Encoder
from src.data.batch import DetokBatch
from src.inspect import build_on_meta, memory_estimate
from src.pipelines.detok import denoise
from src.utils.config import ConfigError, check_config
from tests.helpers import compose_cfg, tiny_run_cfg

pytestmark = pytest.mark.smoke

S1, S2 = "seedx_detok_pretrain_tiny", "seedx_detok_cond_tiny"


def build(experiment, tmp_path, overrides=()):
    module = hydra.utils.instantiate(tiny_run_cfg(experiment, tmp_path, list(overrides)).stage, _convert_="all")
    module.configure_model()
    return module.train()


def first_batch(experiment, tmp_path, with_cond=False):
    # Shuffled (a seeded permutation): stage 2's edit and caption records mix within a batch.
    dm = hydra.utils.instantiate(tiny_run_cfg(experiment, tmp_path).data, shuffle=with_cond)
    dm.setup("fit")
    return next(b for b in dm.train_dataloader()
                if b["batch_size"] == 4 and (not with_cond or 0 < int(b["has_cond"].sum()) < 4))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s1")
    return build(S1, tmp), first_batch(S1, tmp)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2")
    return build(S2, tmp), first_batch(S2, tmp, with_cond=True)


class Capture:
    """What a module was called with (forward pre-hook): positional args and kwargs of each call."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(([a.detach().clone() if torch.is_tensor(a) else a for a in args], kwargs))

    def remove(self):
        self.handle.remove()


def unet_inputs(module, batch, split="train", rank=0, step=0, monkeypatch=None, reset=True):
    """(noisy latents, timesteps) the UNet gets from one compute_losses at (rank, step)."""
    if monkeypatch is not None:
        monkeypatch.setattr(type(module), "global_rank", property(lambda self: rank))
        monkeypatch.setattr(type(module), "global_step", property(lambda self: step))
    if reset:
        module._micro = (-1, 0)
    cap = Capture(module.unet)
    torch.manual_seed(0)  # every rank's global RNG is seeded alike (seed_everything): it must not matter
    try:
        with torch.no_grad():
            module.compute_losses(batch, split)
    finally:
        cap.remove()
    args, _ = cap.calls[0]
    return args[0], args[1]


# ---- 2: per-rank noise ------------------------------------------------------------------------------------
def test_each_rank_draws_its_own_noise_and_timesteps(stage1, monkeypatch):
    module, batch = stage1
    x0, t0 = unet_inputs(module, batch, rank=0, step=3, monkeypatch=monkeypatch)
    x1, t1 = unet_inputs(module, batch, rank=1, step=3, monkeypatch=monkeypatch)
    assert not torch.equal(x0, x1) and not torch.equal(t0, t1)
    again_x, again_t = unet_inputs(module, batch, rank=0, step=3, monkeypatch=monkeypatch)
    assert torch.equal(again_x, x0) and torch.equal(again_t, t0)  # a pure function of (seed, rank, step)
    # The next micro-batch of the same step (gradient accumulation) and the next step draw anew.
    micro_x, _ = unet_inputs(module, batch, rank=0, step=3, monkeypatch=monkeypatch, reset=False)
    step_x, _ = unet_inputs(module, batch, rank=0, step=4, monkeypatch=monkeypatch)
    assert not torch.equal(micro_x, x0) and not torch.equal(step_x, x0)
    # Validation keeps one fixed stream on every rank.
    v0, _ = unet_inputs(module, batch, "val", rank=0, step=3, monkeypatch=monkeypatch)
    v1, _ = unet_inputs(module, batch, "val", rank=1, step=9, monkeypatch=monkeypatch)
    assert torch.equal(v0, v1)


def test_noise_seed_travels_with_the_checkpoint(tmp_path):
    def stage(seed):
        return hydra.utils.instantiate(tiny_run_cfg(S1, tmp_path, [f"seed={seed}"]).stage, _convert_="all")

    saved, resumed = stage(42), stage(7)
    assert (saved.noise_seed, resumed.noise_seed) == (42, 7)  # stage.noise_seed follows the run's seed
    ckpt = {"state_dict": {}}  # stages not built: no weights to filter or check
    saved.on_save_checkpoint(ckpt)
    resumed.on_load_checkpoint(ckpt)
    assert resumed.noise_seed == 42
    assert resumed.step_generator("train").initial_seed() == saved.step_generator("train").initial_seed()


# ---- 3: fp32 latents under bf16 autocast --------------------------------------------------------------------
def test_bf16_autocast_keeps_latents_fp32_live_and_precomputed_alike(stage1):
    module, batch = stage1
    pixels = batch["vae_pixels"]
    with torch.no_grad():
        reference = module.batch_latents(DetokBatch(vae_pixels=pixels), torch.Generator().manual_seed(5))
    # The feature store's posterior, written by data_prep under bf16-mixed as a bf16 run would write it.
    encoder = Encoder({"vit": module.vit, "vae": module.vae}, torch.device("cpu"), "bf16-mixed", torch.float32,
                      vit_chunk=64, vae_chunk=16)
    items = [{"vit": {}, "vae": {"vae.0": p}} for p in pixels]
    encoder.encode(items)
    moments = torch.stack([it["tensors"]["vae.0"] for it in items])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        live = module.batch_latents(DetokBatch(vae_pixels=pixels), torch.Generator().manual_seed(5))
        stored = module.batch_latents(DetokBatch(vae_moments=moments), torch.Generator().manual_seed(5))
        noisy, _ = unet_inputs(module, batch)
    assert live.dtype == stored.dtype == noisy.dtype == torch.float32
    torch.testing.assert_close(live, reference)  # an encode in bf16 is off by ~1e-2
    torch.testing.assert_close(stored, live)


def test_bf16_autocast_keeps_condition_latents_fp32(stage2):
    module, batch = stage2
    with torch.no_grad():
        reference = module.condition_latents(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = module.condition_latents(batch)
    assert cond.dtype == torch.float32
    torch.testing.assert_close(cond, reference)


def test_fsdp2_gathers_the_vae_in_fp32_under_a_bf16_param_dtype(tmp_path, monkeypatch):
    from src.parallel import FSDP2Strategy
    from src.stages import base

    seen = {}
    monkeypatch.setattr(base, "parallelize", lambda child, blocks, mesh, opts, forward_methods=(): seen.update(
        {type(child).__name__: opts.param_dtype}))
    module = hydra.utils.instantiate(tiny_run_cfg(S1, tmp_path).stage, _convert_="all")
    strategy = FSDP2Strategy(fsdp2={"param_dtype": "bfloat16"})
    strategy.parallel_devices = [torch.device("cpu")]  # where the meta-built towers are filled
    module._trainer = types.SimpleNamespace(strategy=strategy)
    module.configure_model()
    assert not any(p.is_meta for p in module.parameters())
    assert seen == {"QwenViT": "bfloat16", "ResamplerXLV2": "bfloat16", "UNet2DConditionModel": "bfloat16",
                    "AutoencoderKL": None}


# ---- 4: InstructPix2Pix dropout ------------------------------------------------------------------------------
def test_drop_intervals_are_disjoint_and_rates_are_over_conditioned_samples(stage2, monkeypatch):
    module, _ = stage2
    monkeypatch.setattr(module, "feature_drop_rate", 0.1)
    monkeypatch.setattr(module, "both_drop_rate", 0.2)
    monkeypatch.setattr(module, "cond_drop_rate", 0.3)
    u = torch.tensor([0.05, 0.15, 0.35, 0.7, 0.05, 0.15])
    batch = DetokBatch(has_cond=torch.tensor([True, True, True, True, False, False]))
    drops = module.drop_masks(u, batch)
    assert drops["features"].tolist() == [True, True, False, False, True, True]
    assert drops["image"].tolist() == [False, True, True, False, False, True]
    rates = {k: float(v) for k, v in module.drop_rates(drops, batch).items()}
    assert rates == {"drop_features": 0.25, "drop_image": 0.25, "drop_both": 0.25}  # the 4 conditioned ones
    many = module.drop_masks(torch.rand(20000, generator=torch.Generator().manual_seed(0)), DetokBatch())
    rates = module.drop_rates(many, DetokBatch(has_cond=torch.ones(20000, dtype=torch.bool)))
    for key, want in (("drop_features", 0.1), ("drop_both", 0.2), ("drop_image", 0.3)):
        assert abs(float(rates[key]) - want) < 0.01, (key, rates)


def test_drop_rates_must_fit_one_uniform_draw(tmp_path):
    cfg = tiny_run_cfg(S2, tmp_path, ["stage.feature_drop_rate=0.5", "stage.cond_drop_rate=0.4",
                                      "stage.both_drop_rate=0.2"])
    # checked with the stage's typed node, before anything is instantiated (src.train runs check_config first)
    with pytest.raises(ConfigError, match=r"stage.feature_drop_rate \+ stage.both_drop_rate \+ stage.cond_drop_rate"):
        check_config(cfg)


def test_dropped_features_become_the_negative_and_dropped_images_zeros(stage2, monkeypatch):
    module, batch = stage2
    features = [True, False, True, False]
    image = [False, True, True, False]
    monkeypatch.setattr(module, "drop_masks", lambda u, b: {"features": torch.tensor(features),
                                                            "image": torch.tensor(image)})
    resampler, unet = Capture(module.resampler), Capture(module.unet)
    try:
        with torch.no_grad():
            module.compute_losses(batch, "train")
    finally:
        resampler.remove()
        unet.remove()
    feats = resampler.calls[0][0][0]
    cond_in = unet.calls[0][0][0][:, 4:]
    with torch.no_grad():
        positive = module.batch_features(batch)
        cond = module.condition_latents(batch)
    negative = module.negative_features()[0]
    for i in range(4):
        torch.testing.assert_close(feats[i], negative if features[i] else positive[i])
        torch.testing.assert_close(cond_in[i], torch.zeros_like(cond[i]) if image[i] else cond[i])


# ---- 5: the unconditional branch ------------------------------------------------------------------------
def test_official_negative_is_the_vits_pooled_zero_image_features(stage1, tmp_path):
    module, _ = stage1
    size = module.vit_cfg.image_size
    with torch.no_grad():
        want = module.vit.pool_for_generation(module.vit(torch.zeros(1, 3, size, size)))
    got = module.negative_features()
    cfg = module.vit_cfg
    assert got.shape == (1, cfg.n_queries // cfg.gen_pool_kernel, cfg.output_dim)  # pooled like the positives
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0
    assert not any("negative" in k for k in module.state_dict())  # cached, never checkpointed
    zeros = hydra.utils.instantiate(tiny_run_cfg(S1, tmp_path, ["stage.negative=zeros"]).stage, _convert_="all")
    zeros.configure_model()
    assert torch.count_nonzero(zeros.negative_features()) == 0 and zeros.negative_features().shape == got.shape


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_denoise_uses_the_given_negative(stage, request):
    module, batch = request.getfixturevalue(stage)
    with_cond = stage == "stage2"
    with torch.no_grad():
        feats = module.batch_features(batch)
        cond = module.condition_latents(batch) if with_cond else None
    negative = torch.randn(1, *feats.shape[1:], generator=torch.Generator().manual_seed(1))
    cap = Capture(module.resampler)
    try:
        denoise(module.resampler, module.unet, module.noise_scheduler.config, feats, module.time_ids(batch),
                (4, module.detok_cfg.latent_size, module.detok_cfg.latent_size), negative=negative, steps=1,
                cond_latents=cond, generator=torch.Generator().manual_seed(0))
    finally:
        cap.remove()
    branches = cap.calls[0][0][0].chunk(3 if with_cond else 2)
    torch.testing.assert_close(branches[0], feats)
    for uncond in branches[1:]:
        torch.testing.assert_close(uncond, negative.expand_as(feats))


# ---- 13: memory on the DDP path -------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(stage1, tmp_path):
    module, batch = stage1
    ckpt = build(S1, tmp_path, ["model.detokenizer.gradient_checkpointing=true"])
    assert ckpt.unet.is_gradient_checkpointing and not module.unet.is_gradient_checkpointing
    grads = []
    for m in (module, ckpt):
        m.zero_grad()
        m.compute_losses(batch, "val")["loss"].backward()  # val: fixed noise and timesteps
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
    module.zero_grad()


def test_frozen_towers_in_bf16_keep_the_vae_encoder_fp32(stage1, tmp_path):
    module, batch = stage1
    half = build(S1, tmp_path, ["stage.frozen_dtype=bf16"])
    assert {p.dtype for p in half.vit.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vae.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vae.encoder.parameters()} == {torch.float32}
    assert {p.dtype for n, p in half.named_parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = half.compute_losses(batch, "train")["loss"]
        with torch.no_grad():
            latents = half.batch_latents(batch, torch.Generator().manual_seed(5))
            want = module.batch_latents(batch, torch.Generator().manual_seed(5))
    assert torch.isfinite(loss)
    torch.testing.assert_close(latents, want)  # same encoder weights, fp32 encode
    grid = half.sample_images(batch, torch.Generator().manual_seed(0))
    assert grid["reconstruction"].dtype == torch.float32 and torch.isfinite(grid["reconstruction"]).all()


def test_inspect_shows_less_frozen_memory_with_bf16_towers():
    est = {}
    for dtype in ("null", "bf16"):
        cfg = compose_cfg("seedx_detok_pretrain", overrides=[f"stage.frozen_dtype={dtype}"])
        est[dtype] = memory_estimate(build_on_meta(cfg), cfg)
    # ViT 1,935,610,624 params at 2 bytes less, plus the VAE decoder's ~49.5M.
    saved = est["null"]["frozen_weights"] - est["bf16"]["frozen_weights"]
    assert 3.6 < saved < 3.8, est
    assert est["null"]["trainable_weights"] == est["bf16"]["trainable_weights"]
    assert est["bf16"]["total"] < est["null"]["total"]


def test_frozen_bf16_needs_bf16_training(tmp_path):
    from src.train import train

    with pytest.raises(ValueError, match="stage.frozen_dtype"):
        train(tiny_run_cfg(S1, tmp_path, ["stage.frozen_dtype=bf16", "trainer.max_steps=1"]))


def test_stage2_trains_with_checkpointing_and_bf16_towers(tmp_path):
    from src.train import train

    metrics, objects = train(tiny_run_cfg(S2, tmp_path, [
        "trainer.max_steps=2", "trainer.precision=bf16-mixed", "stage.frozen_dtype=bf16",
        "model.detokenizer.gradient_checkpointing=true", "callbacks.sample_images.every_n_steps=0",
        "trainer.limit_val_batches=0"]))
    module = objects["module"]
    assert module.unet.is_gradient_checkpointing and next(module.vit.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["train/drop_features"] <= 1.0
