"""The SEED tokenizer as released (AILab-CVC/SEED `Blip2QformerQuantizer`, facts from
shared/reference/official-seed-tokenizer.md): the quantiser, the decoder, the numerics, and the converter of the
released weights, checked against an independent reference of the released forward written here from that
document (plain torch on the released key names, tiny sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from src.models.seed_codec import SeedCodec, SeedCodecConfig
from src.models.vq import VectorQuantizer, VQConfig
from tests.helpers import built_stage, compose_cfg

# the tiny twins' sizes (conf/model/*/tiny.yaml)
EVA_W, EVA_HEADS, EVA_MLP, EVA_DEPTH, IMG, PATCH = 32, 2, 64, 2, 56, 14
W, HEADS, LAYERS, INTER, Q = 32, 2, 2, 64, 32
CODES, DIM = 8192, 32
DOWN = [16, 8, 4]
GEN = 32


# ---- the quantiser ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_vq_picks_the_raw_euclidean_nearest_code_first_on_ties_and_cosine_only_as_an_option():
    vq = VectorQuantizer(VQConfig(num_codes=4, dim=2))
    with torch.no_grad():  # row 0: same direction as z but far; rows 1 and 2: nearer, equal (a tie); row 3 far
        vq.embedding.weight.copy_(torch.tensor([[10.0, 0.1], [0.5, 0.5], [0.5, 0.5], [-3.0, 0.0]]))
    z = torch.tensor([[1.0, 0.0]])
    assert vq.codes_of(z).tolist() == [1]  # Euclidean, first index of the tie
    assert torch.equal(vq(z)["quantized"], torch.tensor([[0.5, 0.5]]))  # the raw codebook row, not normalised
    cosine = VectorQuantizer(VQConfig(num_codes=4, dim=2, l2_norm=True))
    cosine.load_state_dict(vq.state_dict())
    assert cosine.codes_of(z).tolist() == [0]  # ours: by direction


@pytest.mark.unit
def test_vq_beta_multiplies_the_codebook_term_and_gradients_pass_straight_through():
    """Released (legacy=True): loss = mean((sg(e)-z)^2) + beta * mean((e-sg(z))^2). The value is 1.25 x MSE
    either way; the gradients pin which term beta multiplies."""
    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(num_codes=16, dim=4, beta=0.25))
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = vq(z)
    e = vq.embedding.weight[out["codes"]].detach()
    n = z.numel()
    assert torch.allclose(out["loss_vq"], 1.25 * F.mse_loss(e, z.detach()))
    out["loss_vq"].backward()
    assert torch.allclose(z.grad, 2 * (z.detach() - e) / n, atol=1e-7)  # commitment: weight 1 on z
    want = torch.zeros_like(vq.embedding.weight).index_add_(
        0, out["codes"].flatten(), (0.25 * 2 * (e - z.detach()) / n).reshape(-1, 4))
    assert torch.allclose(vq.embedding.weight.grad, want, atol=1e-7)  # codebook: weight beta
    z2 = z.detach().clone().requires_grad_(True)
    (vq(z2)["quantized"] * torch.arange(4.0)).sum().backward()
    assert torch.equal(z2.grad, torch.arange(4.0).expand(3, 5, 4))  # straight-through: identity


# ---- the decoder --------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_full_size_codec_has_the_released_shapes_heads_and_eps():
    with torch.device("meta"):
        codec = SeedCodec(SeedCodecConfig(), width=768, num_queries=32, gen_tokens=1, gen_dim=1024)
    from tests.test_seed_tokenizer import SEED_CODEC_PARAMS

    shapes = {k: list(v.shape) for k, v in codec.state_dict().items()}
    assert shapes["decode_task_layer.0.weight"] == [32, 32] and shapes["decode_task_layer.2.weight"] == [768, 32]
    assert shapes["image_down.0.weight"] == [256, 768] and shapes["image_down.4.weight"] == [32, 128]
    assert "image_down.0.bias" not in shapes and shapes["distill_image_proj.weight"] == [1024, 1024]
    assert shapes["blocks.3.attn.qkv.weight"] == [2304, 768] and shapes["blocks_image.3.mlp.fc1.weight"] == [3072, 768]
    assert shapes["pos_embed"] == shapes["pos_embed_image"] == [1, 32, 768]
    assert sum(p.numel() for p in codec.parameters()) == SEED_CODEC_PARAMS
    for block in [*codec.blocks, *codec.blocks_image]:
        assert block.attn.num_heads == 12 and block.norm1.eps == block.norm2.eps == 1e-6


@pytest.mark.unit
def test_reverse_qformer_head_has_one_query_cross_attention_in_layers_0_and_2_and_no_causal_mask():
    torch.manual_seed(0)
    cfg = SeedCodecConfig(vq={"num_codes": 16, "dim": 4}, decode_depth=1, decode_heads=2, head="reverse_qformer",
                          reverse_qformer_heads=2, reverse_qformer_intermediate_size=32)
    codec = SeedCodec(cfg, width=16, num_queries=4, gen_tokens=1, gen_dim=24).eval()
    layers = codec.reverse_qformer.encoder.layer
    assert [lay.has_cross_attention for lay in layers] == [True, False, True, False]
    assert codec.reverse_tokens.shape == (1, 1, 16) and codec.distill_image_proj.weight.shape == (24, 16)
    assert codec.decode_codes(torch.tensor([[1, 2, 3, 4]])).shape == (1, 1, 24)
    with pytest.raises(ValueError, match="head=image_down gives one embedding"):
        SeedCodec(SeedCodecConfig(vq={"num_codes": 16, "dim": 4}, decode_heads=2), 16, 4, gen_tokens=77, gen_dim=8)


# ---- an official-layout tiny release and an independent reference of its forward ------------------------------
def _t(gen, *shape, scale=0.3, offset=0.0):
    return torch.randn(*shape, generator=gen) * scale + offset


def _vit_block_state(gen, prefix: str, width: int, hidden: int, eva: bool) -> dict:
    s = {f"{prefix}.norm1.weight": _t(gen, width, scale=0.1, offset=1), f"{prefix}.norm1.bias": _t(gen, width, scale=0.1),
         f"{prefix}.attn.qkv.weight": _t(gen, 3 * width, width),
         f"{prefix}.attn.proj.weight": _t(gen, width, width), f"{prefix}.attn.proj.bias": _t(gen, width, scale=0.1),
         f"{prefix}.norm2.weight": _t(gen, width, scale=0.1, offset=1), f"{prefix}.norm2.bias": _t(gen, width, scale=0.1),
         f"{prefix}.mlp.fc1.weight": _t(gen, hidden, width), f"{prefix}.mlp.fc1.bias": _t(gen, hidden, scale=0.1),
         f"{prefix}.mlp.fc2.weight": _t(gen, width, hidden), f"{prefix}.mlp.fc2.bias": _t(gen, width, scale=0.1)}
    if eva:  # EVA: q and v biases, no k bias
        s[f"{prefix}.attn.q_bias"], s[f"{prefix}.attn.v_bias"] = _t(gen, width, scale=0.1), _t(gen, width, scale=0.1)
    else:
        s[f"{prefix}.attn.qkv.bias"] = _t(gen, 3 * width, scale=0.1)
    return s


def _ln(gen, prefix):
    return {f"{prefix}.weight": _t(gen, W, scale=0.1, offset=1), f"{prefix}.bias": _t(gen, W, scale=0.1)}


def official_eva_state(gen, depth: int = EVA_DEPTH + 1) -> dict:
    """LAVIS eva_vit_g.pth's layout (one block more than BLIP-2 reads, as the 40-block file)."""
    s = {"cls_token": _t(gen, 1, 1, EVA_W), "pos_embed": _t(gen, 1, 1 + (IMG // PATCH) ** 2, EVA_W),
         "patch_embed.proj.weight": _t(gen, EVA_W, 3, PATCH, PATCH, scale=0.05),
         "patch_embed.proj.bias": _t(gen, EVA_W, scale=0.1)}
    for i in range(depth):
        s.update(_vit_block_state(gen, f"blocks.{i}", EVA_W, EVA_MLP, eva=True))
    return s


def official_quantizer_state(gen) -> dict:
    """seed_quantizer.pt's layout (seed_quantizer_keys.json) at the tiny sizes, plus tensors the model does not
    use (the text FFN and a stage-1 head the release may hold)."""
    s = {"query_tokens": _t(gen, 1, Q, W, scale=1.0), "pos_embed": _t(gen, 1, Q, W), "pos_embed_image": _t(gen, 1, Q, W),
         "ln_vision.weight": _t(gen, EVA_W, scale=0.1, offset=1), "ln_vision.bias": _t(gen, EVA_W, scale=0.1),
         "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
         **_ln(gen, "Qformer.bert.embeddings.LayerNorm")}
    for i in range(LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}"
        kinds = ["attention", "crossattention"] if i % 2 == 0 else ["attention"]
        for kind in kinds:
            kv_in = EVA_W if kind == "crossattention" else W
            for name, d_in in (("query", W), ("key", kv_in), ("value", kv_in)):
                s[f"{p}.{kind}.self.{name}.weight"] = _t(gen, W, d_in)
                s[f"{p}.{kind}.self.{name}.bias"] = _t(gen, W, scale=0.1)
            s[f"{p}.{kind}.output.dense.weight"], s[f"{p}.{kind}.output.dense.bias"] = _t(gen, W, W), _t(gen, W, scale=0.1)
            s.update(_ln(gen, f"{p}.{kind}.output.LayerNorm"))
        s[f"{p}.intermediate_query.dense.weight"] = _t(gen, INTER, W)
        s[f"{p}.intermediate_query.dense.bias"] = _t(gen, INTER, scale=0.1)
        s[f"{p}.output_query.dense.weight"] = _t(gen, W, INTER)
        s[f"{p}.output_query.dense.bias"] = _t(gen, W, scale=0.1)
        s.update(_ln(gen, f"{p}.output_query.LayerNorm"))
    s["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = _t(gen, INTER, W)  # text FFN: unused
    s["vision_proj.weight"] = _t(gen, 16, W)  # stage-1 head: unused
    s["quantize.embedding.weight"] = _t(gen, CODES, DIM, scale=1.0)
    s.update({"encode_task_layer.0.weight": _t(gen, W, W), "encode_task_layer.0.bias": _t(gen, W, scale=0.1),
              "encode_task_layer.2.weight": _t(gen, DIM, W, scale=1.0), "encode_task_layer.2.bias": _t(gen, DIM, scale=0.1),
              "decode_task_layer.0.weight": _t(gen, DIM, DIM), "decode_task_layer.0.bias": _t(gen, DIM, scale=0.1),
              "decode_task_layer.2.weight": _t(gen, W, DIM), "decode_task_layer.2.bias": _t(gen, W, scale=0.1)})
    for branch in ("blocks", "blocks_image"):
        for i in range(2):
            s.update(_vit_block_state(gen, f"{branch}.{i}", W, 4 * W, eva=False))
    for i, (d_in, d_out) in enumerate(zip([W, *DOWN[:-1]], DOWN)):
        s[f"image_down.{2 * i}.weight"] = _t(gen, d_out, d_in)
    s["distill_image_proj.weight"], s["distill_image_proj.bias"] = _t(gen, GEN, Q * DOWN[-1]), _t(gen, GEN, scale=0.1)
    return s


def _heads(x, h):  # (B, N, C) -> (B, H, N, C/H)
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def _merge(x):  # (B, H, N, d) -> (B, N, H*d)
    return x.transpose(1, 2).flatten(2)


def ref_vit_block(s, p, x, heads, eps, qkv_bias):
    """vit.py / eva_vit.py Block: x + attn(norm1 x); x + mlp(norm2 x); qkv laid out [Q;K;V], scale on q."""
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"], eps)
    qkv = F.linear(h, s[f"{p}.attn.qkv.weight"], qkv_bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    att = (q @ k.transpose(-2, -1)).softmax(-1)
    x = x + F.linear(_merge(att @ v), s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
    h = F.layer_norm(x, (c,), s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"])), s[f"{p}.mlp.fc2.weight"],
                 s[f"{p}.mlp.fc2.bias"])
    return x + h


def ref_eva(s, pixels):
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["pos_embed"]
    for i in range(EVA_DEPTH):  # BLIP-2 reads depth 39 of 40: the file's last block unused; no final norm
        p = f"blocks.{i}"
        bias = torch.cat([s[f"{p}.attn.q_bias"], torch.zeros_like(s[f"{p}.attn.q_bias"]), s[f"{p}.attn.v_bias"]])
        x = ref_vit_block(s, p, x, EVA_HEADS, 1e-6, bias)
    return x


def _bert_attention(s, p, x, kv, mask_add):
    q = _heads(F.linear(x, s[f"{p}.self.query.weight"], s[f"{p}.self.query.bias"]), HEADS)
    k = _heads(F.linear(kv, s[f"{p}.self.key.weight"], s[f"{p}.self.key.bias"]), HEADS)
    v = _heads(F.linear(kv, s[f"{p}.self.value.weight"], s[f"{p}.self.value.bias"]), HEADS)
    scores = q @ k.transpose(-2, -1) / math.sqrt(W // HEADS) + mask_add
    ctx = _merge(scores.softmax(-1) @ v)
    out = F.linear(ctx, s[f"{p}.output.dense.weight"], s[f"{p}.output.dense.bias"])
    return F.layer_norm(out + x, (W,), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], 1e-12)


def ref_causal_qformer(s, image_embeds):
    """qformer_causual.py on 32 queries: embeddings LN, tril mask added as (1-m)*-10000, post-LN layers,
    cross-attention on even layers, the query FFN; eps 1e-12."""
    b = image_embeds.shape[0]
    x = F.layer_norm(s["query_tokens"].expand(b, -1, -1), (W,), s["Qformer.bert.embeddings.LayerNorm.weight"],
                     s["Qformer.bert.embeddings.LayerNorm.bias"], 1e-12)
    causal = (1.0 - torch.tril(torch.ones(Q, Q))) * -10000.0
    for i in range(LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}"
        x = _bert_attention(s, f"{p}.attention", x, x, causal)
        if i % 2 == 0:
            x = _bert_attention(s, f"{p}.crossattention", x, image_embeds, 0.0)
        h = F.gelu(F.linear(x, s[f"{p}.intermediate_query.dense.weight"], s[f"{p}.intermediate_query.dense.bias"]))
        h = F.linear(h, s[f"{p}.output_query.dense.weight"], s[f"{p}.output_query.dense.bias"])
        x = F.layer_norm(h + x, (W,), s[f"{p}.output_query.LayerNorm.weight"], s[f"{p}.output_query.LayerNorm.bias"],
                         1e-12)
    return x


def _task(s, name, x):
    return F.linear(torch.tanh(F.linear(x, s[f"{name}.0.weight"], s[f"{name}.0.bias"])), s[f"{name}.2.weight"],
                    s[f"{name}.2.bias"])


def ref_codes(s, eva, pixels):
    """get_codebook_indices: EVA -> ln_vision (eps 1e-5) -> causal Q-Former -> encode_task_layer -> argmin of
    |z|^2 + |e|^2 - 2 z.e on raw vectors."""
    image = F.layer_norm(ref_eva(eva, pixels), (EVA_W,), s["ln_vision.weight"], s["ln_vision.bias"], 1e-5)
    z = _task(s, "encode_task_layer", ref_causal_qformer(s, image)).reshape(-1, DIM)
    e = s["quantize.embedding.weight"]
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    return d.argmin(1).reshape(pixels.shape[0], Q)


def _branch(s, name, x):
    for i in range(2):
        x = ref_vit_block(s, f"{name}.{i}", x, HEADS, 1e-6, s[f"{name}.{i}.attn.qkv.bias"])
    return x


def ref_decode(s, codes):
    """get_codebook_entry (use_qformer_image=False): codebook -> decode_task_layer -> + pos_embed_image ->
    blocks_image -> image_down (ReLU, no bias) -> query-major flatten -> distill_image_proj."""
    d = _task(s, "decode_task_layer", s["quantize.embedding.weight"][codes])
    h = _branch(s, "blocks_image", d + s["pos_embed_image"])
    h = F.relu(F.linear(h, s["image_down.0.weight"]))
    h = F.linear(F.relu(F.linear(h, s["image_down.2.weight"])), s["image_down.4.weight"])
    return F.linear(h.reshape(h.shape[0], -1), s["distill_image_proj.weight"], s["distill_image_proj.bias"])


def ref_recon(s, codes):
    """The recon branch (training: its output is compared by cosine with the Q-Former output)."""
    return _branch(s, "blocks", _task(s, "decode_task_layer", s["quantize.embedding.weight"][codes]) + s["pos_embed"])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An official-layout tiny release on disk and its conversion (in-process, as the CLI runs it)."""
    from data_prep.convert_seed_tokenizer import main

    tmp = tmp_path_factory.mktemp("release")
    gen = torch.Generator().manual_seed(0)
    eva, quant = official_eva_state(gen), official_quantizer_state(gen)
    torch.save(eva, tmp / "eva_vit_g.pth")
    torch.save(quant, tmp / "seed_quantizer.pt")
    main(["--quantizer", str(tmp / "seed_quantizer.pt"), "--eva", str(tmp / "eva_vit_g.pth"), "--out", str(tmp / "out"),
          "--experiment", "seed_tokenizer_v2_tiny"])
    return {"dir": tmp, "eva": eva, "quant": quant, "ckpt": tmp / "out" / "seed_tokenizer.ckpt"}


@pytest.mark.smoke
def test_converted_release_loads_with_every_key_and_lists_what_it_does_not_use(release):
    from src.specs.inference import build_image_tokenizer

    ckpt = torch.load(release["ckpt"], weights_only=False)
    stage = build_image_tokenizer(str(release["ckpt"]), None)
    own = {k for k in stage.state_dict() if not k.startswith("target.")}
    assert set(ckpt["state_dict"]) == own  # no missing key, nothing left to random init
    assert ckpt["hyper_parameters"]["weights_in_checkpoint"] is True
    assert torch.equal(stage.codec.quantize.embedding.weight, release["quant"]["quantize.embedding.weight"])
    assert torch.equal(stage.qformer.qformer.encoder.layer[0].crossattention.attention.key.weight,
                       release["quant"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    report = json.loads((release["ckpt"].parent / "conversion_report.json").read_text())
    assert set(report["unused_released_tensors"]) == {"Qformer.bert.embeddings.position_ids", "vision_proj.weight",
                                                      "Qformer.bert.encoder.layer.0.intermediate.dense.weight"}
    # a checkpoint missing a frozen tensor is named (nothing else would fill it)
    del ckpt["state_dict"]["qformer.query_tokens"]
    torch.save(ckpt, release["dir"] / "partial.ckpt")
    with pytest.raises(RuntimeError, match="lacks 1 tokenizer tensors: qformer.query_tokens"):
        build_image_tokenizer(str(release["dir"] / "partial.ckpt"), None)


@pytest.mark.smoke
def test_codes_and_decoder_output_equal_the_reference_forward_of_the_release(release):
    from src.specs.inference import build_image_tokenizer

    stage = build_image_tokenizer(str(release["ckpt"]), None)
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    codes = stage.codes_of(pixels)
    with torch.no_grad():
        want = ref_codes(release["quant"], release["eva"], pixels)
        assert len(set(want.flatten().tolist())) > 8  # a real test: many different codes
        assert torch.equal(codes, want)
        gen = stage.codec.decode_codes(codes)
        assert gen.shape == (2, 1, GEN)
        assert torch.allclose(gen[:, 0], ref_decode(release["quant"], codes), atol=1e-5, rtol=1e-4)
        recon = stage.codec.reconstruct(stage.codec.decode_task_layer(stage.codec.quantize.lookup(codes)))
        assert torch.allclose(recon, ref_recon(release["quant"], codes), atol=1e-5, rtol=1e-4)


@pytest.mark.unit
def test_causal_mask_eps_values_of_the_encode_path(release):
    """Query i sees queries 0..i only; EVA LayerNorms eps 1e-6, ln_vision 1e-5, every Q-Former LayerNorm 1e-12."""
    from src.specs.inference import build_image_tokenizer

    stage = build_image_tokenizer(str(release["ckpt"]), None)
    image = torch.randn(1, 17, EVA_W)
    queries = stage.qformer.query_tokens.detach().clone()
    base = stage.qformer(image, queries)
    changed = queries.clone()
    changed[:, 20:] += 1.0  # later queries move ...
    out = stage.qformer(image, changed)
    assert torch.allclose(out[:, :20], base[:, :20], atol=1e-6)  # ... earlier outputs do not
    assert not torch.allclose(out[:, 20:], base[:, 20:])
    vit_eps = {m.eps for m in stage.vit.modules() if isinstance(m, torch.nn.LayerNorm)}
    qf_eps = {m.eps for m in stage.qformer.qformer.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert vit_eps == {1e-6} and stage.qformer.ln_vision.eps == 1e-5 and qf_eps == {1e-12}


@pytest.mark.smoke
def test_a_renamed_or_missing_released_key_is_named(release, tmp_path):
    from data_prep.convert_seed_tokenizer import convert

    bad = dict(release["quant"])
    bad["encode_task_layer.0.weigth"] = bad.pop("encode_task_layer.0.weight")
    del bad["blocks_image.1.attn.qkv.bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        convert(str(tmp_path / "bad.pt"), str(release["dir"] / "eva_vit_g.pth"), "seed_tokenizer_v2_tiny")
    msg = str(err.value)
    assert "unknown released keys (1): encode_task_layer.0.weigth" in msg
    assert "missing (released names) (2): blocks_image.1.attn.qkv.bias, encode_task_layer.0.weight" in msg
    with pytest.raises(ValueError, match="holds no EVA ViT"):
        convert(str(tmp_path / "bad.pt"), None, "seed_tokenizer_v2_tiny")


@pytest.mark.smoke
def test_converter_cli_help_exits_zero(capsys):
    from data_prep.convert_seed_tokenizer import main
    from tests.helpers import run_module_main

    code, stdout, _ = run_module_main(main, ["--help"], capsys)
    assert code == 0 and "--quantizer" in stdout and "--eva" in stdout


@pytest.mark.smoke
def test_converted_release_tokenises_images_and_seed_llama_draws_through_it(release, tmp_path):
    from omegaconf import OmegaConf

    from data_prep.tokenize_images import main
    from src.data.records import read_jsonl
    from src.generate import generate
    from tests.conftest import ROOT

    main(["--ckpt", str(release["ckpt"]), "--source", str(ROOT / "assets/sample/captions.jsonl"),
          "--out", str(tmp_path / "codes"), "--device", "cpu"])
    records = list(read_jsonl(tmp_path / "codes" / "captions.jsonl"))
    codes = [r["turns"][0]["content"][0]["codes"] for r in records]
    assert len(records) == 10 and all(len(c) == Q and all(0 <= x < CODES for x in c) for c in codes)
    cfg = compose_cfg("seed_llama_pretrain_tiny", tmp_path / "gen", [
        "mode=t2i", f"image_tokenizer.ckpt_path={release['ckpt']}", "seed_decode.steps=2", "generate.max_new_tokens=6",
        "progress=false", "prompt=a red apple"], config_name="generate")
    OmegaConf.resolve(cfg)
    (drawn,) = generate(cfg)
    assert len(drawn["codes"]) == Q and (tmp_path / "gen").exists()


@pytest.mark.smoke
def test_stage2_training_starts_from_a_converted_release(release, tmp_path):
    stage = built_stage("seed_tokenizer_v2_tiny", tmp_path, f"stage.init_from={release['ckpt']}")
    assert torch.equal(stage.codec.quantize.embedding.weight, release["quant"]["quantize.embedding.weight"])
    assert torch.equal(stage.codec.blocks[1].mlp.fc2.weight, release["quant"]["blocks.1.mlp.fc2.weight"])
    assert torch.equal(stage.qformer.query_tokens, release["quant"]["query_tokens"])
    assert all(p.requires_grad for p in stage.codec.parameters())


# ---- data ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_training_views_are_the_released_random_crop_and_flip_and_validation_the_plain_resize(tmp_path):
    import numpy as np
    from PIL import Image

    from src.data.images import vit_view
    from src.data.seed_tokenizer import CaptionedImageBuilder, train_view

    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))  # dark left, bright right
    img = Image.fromarray(ramp)
    views = [train_view(img, 32, seed) for seed in range(16)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert torch.equal(train_view(img, 32, 3), views[3])  # seeded: a resume draws the same
    flipped = [bool(v[0, :, :16].mean() > v[0, :, 16:].mean()) for v in views]
    assert 0 < sum(flipped) < 16  # horizontal flips, some of the time
    assert len({tuple(v[0, 0, :4].tolist()) for v in views}) > 4  # different crops
    img.save(tmp_path / "ramp.png")
    record = {"id": "r1", "source": "s", "_base_dir": str(tmp_path),
              "turns": [{"role": None, "content": [{"image": "ramp.png"}, {"text": "a ramp"}]}]}
    plain = CaptionedImageBuilder(32, True)(record)["pixels"]
    assert torch.equal(plain, vit_view(img, 32))
    augmented = CaptionedImageBuilder(32, True, augment_seed=7)
    a, b = augmented(record)["pixels"], augmented(record)["pixels"]
    assert torch.equal(a, b) and not torch.equal(a, plain)


# ---- stage 1's start: BLIP-2 / BERT weights ---------------------------------------------------------------------
def _to_lavis(key: str) -> str:
    """This repo's stage-1 names -> LAVIS Blip2Qformer's (BERT names), written out here independently."""
    for ours, lavis in (("qformer.qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
                        ("text_embeddings.", "Qformer.bert.embeddings."), ("lm_head.", "Qformer.cls."),
                        ("qformer.qformer.", "Qformer.bert."), ("qformer.", "")):
        if key.startswith(ours):
            key = lavis + key[len(ours):]
            break
    return key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                            ".crossattention.self.")


@pytest.mark.unit
def test_stage1_starts_from_lavis_blip2_weights_or_bert_and_names_what_is_missing(tmp_path):
    from src.models.qformer_pretrain import QFormerPretrainConfig, QFormerPretrainer
    from src.models.seed_qformer_weights import load_qformer_weights

    qformer = {"num_queries": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "encoder_hidden_size": 24, "vocab_size": 50, "max_position_embeddings": 16}
    cfg = QFormerPretrainConfig(qformer=qformer, embed_dim=16, max_text_len=8, itm_weight=1.0, itg_weight=1.0)
    torch.manual_seed(1)
    source = QFormerPretrainer(cfg, 49)
    lavis = {_to_lavis(k): v.clone() for k, v in source.state_dict().items()}
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(16)[None]
    lavis["visual_encoder.cls_token"] = torch.zeros(1, 1, 24)  # the ViT: skipped
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    torch.manual_seed(2)
    target = QFormerPretrainer(cfg, 49)
    load_qformer_weights(target, str(tmp_path / "blip2_pretrained.pth"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    # the released recipe builds no ITM / LM head: their tensors in the file are not an error
    load_qformer_weights(QFormerPretrainer(QFormerPretrainConfig(qformer=qformer, embed_dim=16, max_text_len=8), 49),
                         str(tmp_path / "blip2_pretrained.pth"))
    del lavis["query_tokens"]
    lavis["Qformer.bert.encoder.layer.0.attention.self.qeury.weight"] = lavis.pop(
        "Qformer.bert.encoder.layer.0.attention.self.query.weight")
    torch.save(lavis, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)missing \(2\): qformer.qformer.encoder.layer.0.attention.attention.query"
                                         r".weight, qformer.query_tokens.*unexpected \(1\): .*self.qeury.weight"):
        load_qformer_weights(target, str(tmp_path / "bad.pth"))
    # a bare BERT: the query FFN starts as the text FFN; cross-attention, queries and heads keep their init
    bert = {k.removeprefix("Qformer."): v for k, v in lavis.items() if k.startswith("Qformer.bert.")
            and "crossattention" not in k and "_query" not in k and "qeury" not in k}
    bert["bert.encoder.layer.0.attention.self.query.weight"] = torch.randn(32, 32)
    torch.save(bert, tmp_path / "bert.pth")
    fresh = QFormerPretrainer(QFormerPretrainConfig(qformer=qformer, embed_dim=16, max_text_len=8), 49)
    load_qformer_weights(fresh, str(tmp_path / "bert.pth"))
    layer = fresh.qformer.qformer.encoder.layer[1]
    assert torch.equal(layer.intermediate_query.dense.weight, bert["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(layer.output_query.LayerNorm.bias, bert["bert.encoder.layer.1.output.LayerNorm.bias"])
