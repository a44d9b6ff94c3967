"""The SEED tokenizer stages: stage 1 (causal Q-Former, BLIP-2 losses) and stage 2 (v1 / v2 codec), tiny twins
and full size on meta."""

from __future__ import annotations

import json

import hydra
import pytest
import torch

from src.models.causal_qformer import joint_mask
from src.models.qformer_pretrain import QFormerPretrainConfig, QFormerPretrainer
from src.models.seed_codec import SeedCodec, SeedCodecConfig
from src.models.vq import usage_stats
from src.pipelines.seed_decode import build_decode_pipeline, decode_embeddings
from tests.helpers import built_stage, compose_cfg, lean_checkpoint, tiny_run_cfg, trained_tiny_stage

EVA_G_PARAMS = 985_894_528  # timm eva_giant_patch14 at depth 39, no final norm
QFORMER_PARAMS = 161_852_672  # BLIP-2 Q-Former (BERT-base, cross-attention every 2nd layer) + 32 queries + ln_vision
# stage 2's Q-Former without the text FFN, as released: 105,137,664 + ln_vision 2,816 + queries 24,576
STAGE2_QFORMER_PARAMS = 105_165_056
SEED_CODEC_PARAMS = 58_938_944  # released seed_quantizer.pt: the tokenizer's non-ViT, non-Q-Former parameters
CLIP_H_VISION_PARAMS = 632_076_800
CLIP_L_TEXT_PARAMS = 123_060_480


def _pixels(n: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


BLIP2_OPTION = {"itc_query": "max", "clamp_temp": True, "itm_weight": 1.0, "itg_weight": 1.0}  # ours, not SEED's


def _tiny_pretrainer(**options) -> QFormerPretrainer:
    torch.manual_seed(0)
    qformer = {"num_queries": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "encoder_hidden_size": 24, "vocab_size": 50, "max_position_embeddings": 16}
    cfg = QFormerPretrainConfig(qformer=qformer, embed_dim=16, max_text_len=8, **options)
    return QFormerPretrainer(cfg, dec_token_id=49).eval()


# ---- stage 1: masks and losses ------------------------------------------------------------------------------
@pytest.mark.unit
def test_joint_mask_for_captioning_and_matching():
    text = torch.tensor([[1, 1, 0]])  # two real tokens, one pad
    itg = joint_mask(2, text, causal_queries=True, text_causal=True)[0, 0].int().tolist()
    assert itg == [[1, 0, 0, 0, 0],   # query 0: itself only
                   [1, 1, 0, 0, 0],   # query 1: queries 0..1, never the text
                   [1, 1, 1, 0, 0],   # text 0: every query, itself
                   [1, 1, 1, 1, 0],   # text 1: every query, text 0..1
                   [1, 1, 1, 1, 0]]   # the pad row sees what is real (no all-masked row)
    itm = joint_mask(2, text, causal_queries=True, text_causal=False)[0, 0].int().tolist()
    assert itm[0] == [1, 0, 1, 1, 0] and itm[2] == [1, 1, 1, 1, 0]  # queries see the real text; text sees all


@pytest.mark.unit
def test_captioning_pass_keeps_queries_blind_to_the_text_and_the_text_causal():
    m = _tiny_pretrainer()
    image = torch.randn(1, 5, 24)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    q = m.cfg.qformer_cfg.num_queries
    base = m.qformer.joint(image, m.text_embeddings(input_ids=ids), mask, text_causal=True)
    changed = ids.clone()
    changed[0, 3] = 20
    moved = m.qformer.joint(image, m.text_embeddings(input_ids=changed), mask, text_causal=True)
    diff = (moved - base).abs().amax(-1)[0]
    assert torch.all(diff[: q + 3] == 0), "queries or earlier text saw text token 3"
    assert torch.all(diff[q + 3:] > 0)
    # matching: the queries read the text
    base = m.qformer.joint(image, m.text_embeddings(input_ids=ids), mask, text_causal=False)
    moved = m.qformer.joint(image, m.text_embeddings(input_ids=changed), mask, text_causal=False)
    assert (moved - base)[0, :q].abs().amax() > 0


@pytest.mark.unit
def test_stage1_losses_fall_on_a_repeated_batch():
    m = _tiny_pretrainer(**BLIP2_OPTION).train()
    image = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(2, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for step in range(25):
        out = m(image, ids, mask, torch.Generator().manual_seed(step))
        assert all(torch.isfinite(v) for v in out.values())
        first = first or {k: float(v.detach()) for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss_itg"]) < first["loss_itg"] and float(out["loss_itc"]) < first["loss_itc"]
    assert float(out["loss"]) < 0.7 * first["loss"]


@pytest.mark.unit
def test_released_stage1_is_itc_on_the_last_causal_query_with_an_unclamped_temperature():
    F = torch.nn.functional
    m = _tiny_pretrainer().eval()  # eval: no dropout, so the reference below sees the same outputs
    assert not hasattr(m, "itm_head") and not hasattr(m, "lm_head")  # ITC only: no unused heads
    image = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(2, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        m.temp.fill_(0.9)  # outside BLIP-2's clamp range: the released code never clamps
        out = m(image, ids, mask)
        assert set(out) == {"loss", "loss_itc"} and float(m.temp) == pytest.approx(0.9)
        # the reference: normalize(vision_proj(query_out))[:, -1] vs normalize(text_proj(CLS)), smoothing 0.1
        q = m.qformer(image)
        text = m.qformer.encode_text(m.text_embeddings(input_ids=ids), mask)
        sim = F.normalize(m.vision_proj(q), dim=-1)[:, -1] @ F.normalize(m.text_proj(text[:, 0]), dim=-1).t() / 0.9
        labels = torch.arange(3)
        want = (F.cross_entropy(sim, labels, label_smoothing=0.1) + F.cross_entropy(sim.t(), labels, label_smoothing=0.1)) / 2
        torch.testing.assert_close(out["loss_itc"], want)
        # only the last query counts
        moved = q.clone()
        moved[:, :-1] += 5.0
        torch.testing.assert_close(m.itc(moved, text)[0], want)


# ---- stage 2: straight-through gradients, usage, stage-1 start ------------------------------------------------
@pytest.mark.unit
def test_straight_through_gradients_reach_the_encoder_from_the_decoder_loss():
    torch.manual_seed(0)
    codec = SeedCodec(SeedCodecConfig(vq={"num_codes": 64, "dim": 8}, decode_depth=1, decode_heads=2,
                                      image_down_dims=[8, 4]), width=16, num_queries=4, gen_tokens=1, gen_dim=12)
    causal = torch.randn(3, 4, 16, requires_grad=True)
    out = codec(causal, torch.randn(3, 1, 12))
    out["loss_gen"].backward()  # the decoder's loss alone: no VQ term, so only the straight-through path
    enc = codec.encode_task_layer[0].weight.grad
    assert enc is not None and enc.abs().sum() > 0
    assert causal.grad is not None and causal.grad.abs().sum() > 0  # and on into what encoded (the Q-Former)
    assert codec.quantize.embedding.weight.grad is None or codec.quantize.embedding.weight.grad.abs().sum() == 0


@pytest.mark.smoke
def test_stage2_counts_codes_exactly_and_resets_dead_codes(tmp_path):
    stage = built_stage("seed_tokenizer_v2_tiny", tmp_path).train()  # training batches count
    pixels = _pixels(3)
    codes = stage.codes_of(pixels)
    assert codes.shape == (3, 32) and codes.dtype == torch.long
    for _ in range(2):
        stage.compute_losses({"pixels": pixels, "caption": ["a"] * 3}, "train")
    stage.eval()  # as Lightning runs validation
    stage.compute_losses({"pixels": pixels, "caption": ["a"] * 3}, "val")  # validation is not counted
    stage.train()
    expected = 2 * torch.bincount(codes.flatten(), minlength=8192)
    assert torch.equal(stage.codec.quantize.usage, expected)
    stats = usage_stats(stage.codec.quantize.usage)
    assert stats["used_codes"] == len(set(codes.flatten().tolist()))
    assert stats["dead_codes"] == 8192 - stats["used_codes"]
    moved = stage.reset_dead_codes(stage.codec.quantize.usage)
    assert moved == stats["dead_codes"]
    # every moved code now sits on an encoder output of the last batch
    last = stage.codec.quantize._last_inputs
    dead = (stage.codec.quantize.usage == 0).nonzero().flatten()[:5]
    for c in dead:
        row = stage.codec.quantize.embedding.weight[c]
        assert any(torch.allclose(row, r) for r in last)


@pytest.mark.smoke
def test_stage2_starts_from_the_stage1_checkpoint(tmp_path):
    stage1, ckpt = trained_tiny_stage("seed_tokenizer_qformer_tiny", tmp_path)
    stage2 = built_stage("seed_tokenizer_v2_tiny", tmp_path / "s2", f"stage.init_from={ckpt}",
                    "model.qformer.allow_random_init=false")
    from src.stages.seed_tokenizer import TEXT_FFN

    want = {k.removeprefix("blip2.qformer."): v for k, v in stage1.state_dict().items()
            if k.startswith("blip2.qformer.") and not TEXT_FFN.search(k)}  # stage 2 has no text FFN, as released
    got = stage2.qformer.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in stage2.qformer.parameters())
    # a checkpoint without the Q-Former (a lean stage-2 one: its frozen tensors dropped) is named, key by key
    other = tmp_path / "stage2.ckpt"
    lean_checkpoint(stage2, other)
    with pytest.raises(ValueError, match="(?s)not a seed_tokenizer \\(or converted\\) checkpoint of this "
                                         "model.qformer.*missing \\(47\\): ln_vision"):
        built_stage("seed_tokenizer_v2_tiny", tmp_path / "s3", f"stage.init_from={other}")


@pytest.mark.config
def test_full_size_stage2_without_a_stage1_checkpoint_names_the_key(tmp_path):
    cfg = compose_cfg("seed_tokenizer_v2", tmp_path)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    with pytest.raises(Exception, match="stage.init_from") as err:
        stage.configure_model()
    assert "model.eva_vit.weights" in str(err.value) and "model.seed_decoder.pretrained_dir" in str(err.value)
    assert not hasattr(stage, "codec")  # nothing was built


@pytest.mark.parametrize(("experiment", "kind"), [("seed_tokenizer_v2_tiny", "unclip"), ("seed_tokenizer_v1_tiny", "sd")])
@pytest.mark.smoke
def test_codes_decode_to_images_through_the_diffusers_pipeline(experiment, kind, tmp_path):
    stage = built_stage(experiment, tmp_path)
    codes = stage.codes_of(_pixels(2))
    embeds = stage.codec.decode_codes(codes)
    assert embeds.shape == (2, stage.decoder_cfg.num_tokens, stage.decoder_cfg.embed_dim)
    pipe = build_decode_pipeline(stage.decoder_cfg)
    images = decode_embeddings(pipe, kind, embeds, steps=2, seed=0)
    res = stage.decoder_cfg.resolution
    assert [im.size for im in images] == [(res, res)] * 2


# ---- tiny twins ------------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("experiment", ["seed_tokenizer_qformer_tiny", "seed_tokenizer_v1_tiny", "seed_tokenizer_v2_tiny"])
def test_tiny_tokenizer_experiments_train_three_steps(experiment, tmp_path):
    from src.train import train

    window = [] if "qformer" in experiment else ["stage.usage_window=3"]
    train(tiny_run_cfg(experiment, tmp_path, ["trainer.max_steps=3", *window]))
    m = json.loads((tmp_path / "metrics.json").read_text())
    parts = ["loss_itc"] if "qformer" in experiment else ["loss_vq", "loss_recon", "loss_gen"]  # stage 1: ITC only
    for k in ["loss", *parts]:
        assert torch.isfinite(torch.tensor(m[f"train/{k}"])), k
    assert m["train/loss"] > 0
    if "qformer" not in experiment:
        assert 1 <= m["train/codebook_perplexity"] <= 32 * 10 and m["train/dead_codes"] == 8192 - m["train/used_codes"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


# ---- full size on meta -----------------------------------------------------------------------------------------
@pytest.mark.config
@pytest.mark.parametrize(("experiment", "target"), [("seed_tokenizer_v2", CLIP_H_VISION_PARAMS),
                                                    ("seed_tokenizer_v1", CLIP_L_TEXT_PARAMS)])
def test_stage2_full_size_on_meta(experiment, target):
    from src.inspect import build_on_meta, count_parameters

    counts = count_parameters(build_on_meta(compose_cfg(experiment)))
    m = counts["modules"]
    assert m["vit"] == {"total": EVA_G_PARAMS, "trainable": 0}
    assert m["qformer"] == {"total": STAGE2_QFORMER_PARAMS, "trainable": 0}
    assert m["target"] == {"total": target, "trainable": 0}
    assert m["codec"]["total"] == m["codec"]["trainable"] == counts["trainable"]
    # the codebook: 8192 x 32
    assert 8192 * 32 < counts["trainable"] < 100_000_000
    if experiment == "seed_tokenizer_v2":  # the released seed_quantizer.pt's layout, parameter for parameter
        assert m["codec"]["total"] == SEED_CODEC_PARAMS
        # the tokenizer itself (the frozen CLIP-H target only trains): the released model's total
        assert counts["without_training_only"] == {"excluded": ["target"], "total": 1_149_998_528,
                                                  "trainable": SEED_CODEC_PARAMS}
        assert counts["total"] - target == EVA_G_PARAMS + STAGE2_QFORMER_PARAMS + SEED_CODEC_PARAMS == 1_149_998_528


@pytest.mark.config
def test_stage1_full_size_on_meta():
    from src.inspect import build_on_meta, count_parameters

    counts = count_parameters(build_on_meta(compose_cfg("seed_tokenizer_qformer")))
    assert counts["modules"]["vit"] == {"total": EVA_G_PARAMS, "trainable": 0}
    assert counts["modules"]["blip2.qformer"]["trainable"] == QFORMER_PARAMS
    assert counts["total"] - counts["trainable"] == EVA_G_PARAMS  # the ViT alone is frozen


# ---- sharded (FSDP2, 2 gloo processes) ---------------------------------------------------------------------------
@pytest.mark.slow  # subprocess runs (~40 s each here); CI runs the slow tier
@pytest.mark.parametrize("experiment", ["seed_tokenizer_qformer_tiny", "seed_tokenizer_v2_tiny", "seed_llama_pretrain_tiny"])
def test_fsdp2_two_processes_train_the_seed_stages(experiment, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [sys.executable, "-m", "src.train", f"experiment={experiment}", f"paths.output_dir={tmp_path}", "logger=csv",
           "strategy=fsdp2", "strategy.fsdp2.param_dtype=null", "~callbacks.progress_bar", "trainer.devices=2",
           "trainer.max_steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank


@pytest.mark.smoke
def test_generate_recon_reconstructs_images_through_a_trained_tokenizer(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from src.data.images import vit_view
    from src.generate import generate
    from src.specs.inference import build_image_tokenizer
    from src.train import train
    from tests.conftest import ROOT

    train(tiny_run_cfg("seed_tokenizer_v2_tiny", tmp_path / "run", ["trainer.max_steps=2"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    photo = ROOT / "assets" / "sample" / "images" / "coffee.jpg"
    cfg = compose_cfg("seed_tokenizer_v2_tiny", tmp_path / "out", [
        "mode=recon", f"image={photo}", f"ckpt_path={ckpt}", "seed_decode.steps=2", "progress=false"],
        config_name="generate")
    OmegaConf.resolve(cfg)
    (result,) = generate(cfg)
    trained = build_image_tokenizer(str(ckpt), None)
    assert result["codes"] == [trained.codes_of(vit_view(Image.open(photo).convert("RGB"), 56)[None])[0].tolist()]
    assert Image.open(result["images"][0]).size == (32, 32)
    with pytest.raises(ValueError, match="answers mode=recon"):
        generate(compose_cfg("seed_tokenizer_v2_tiny", tmp_path / "o2", ["mode=chat", "prompt=hi"],
                             config_name="generate"))


@pytest.mark.unit
def test_eva_weights_load_from_a_deeper_checkpoint_and_name_what_does_not_fit(tmp_path):
    """EVA-CLIP-g has 40 blocks and BLIP-2 reads 39: the extra block and any head/final norm are dropped; every
    other key must fit, and a mismatch names it."""
    from src.models.eva_vit import EvaViTConfig, build_eva_vit, encode, load_eva_weights

    small = EvaViTConfig(image_size=28, width=32, depth=2, heads=2, mlp_ratio=2.0, allow_random_init=True)
    deeper = build_eva_vit(EvaViTConfig(**{**small.__dict__, "depth": 3}), True, seed=1)
    state = {**deeper.state_dict(), "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32),
             "head.weight": torch.zeros(10, 32)}
    torch.save(state, tmp_path / "eva.pth")
    vit = build_eva_vit(small, True, seed=2)
    load_eva_weights(vit, str(tmp_path / "eva.pth"))
    assert all(torch.equal(v, state[k]) for k, v in vit.state_dict().items() if k in state)
    x = torch.randn(1, 3, 28, 28)
    assert encode(vit, x).shape == (1, 5, 32)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(7, 32)
    del state["cls_token"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)missing \(1\): cls_token.*shape mismatch.*blocks.0.attn.qkv.weight"):
        load_eva_weights(build_eva_vit(small, True), str(tmp_path / "bad.pth"))
