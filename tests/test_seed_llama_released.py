"""SEED-LLaMA as released (AILab-CVC/SEED MultiModalLLM, shared/reference/official-seed-tokenizer.md): the 8B
`USER: ...\\nASSISTANT:` template and its text-to-image SFT form, the Vicuna-7B recipe, released tokenizers whose
image tokens are found by name, new rows normal(0, 0.02), unCLIP decode defaults, free interleaved decoding, the
export of the SEED stages."""

from __future__ import annotations

import pytest
import torch

from src.data.mllm import load_tokenizer
from src.data.mllm_sequence import IGNORE_INDEX
from src.data.seed_llama import SEED_LLAMA_GEN_PROMPTS, SEED_LLAMA_GEN_RESPONSES, SeedLlamaSequenceBuilder
from src.models.vocab import add_seed_llama_tokens, seed_llama_token_ids
from tests.conftest import ROOT

TOKENIZER = ROOT / "assets" / "tokenizers" / "tiny-llama"
CODES = list(range(100, 132))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER), extend=add_seed_llama_tokens)


def _enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _image_ids(tokenizer, codes=CODES):
    ids = seed_llama_token_ids(tokenizer)
    return [ids.img_start, *ids.code_ids(torch.tensor(codes)).tolist(), ids.img_end]


# ---- the 8B chat template -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_vicuna_template_multi_turn_as_the_released_sft_data(tokenizer):
    """`<s>USER: {image}{q}\\nASSISTANT:{a}\\nUSER: {q2}\\nASSISTANT:{a2}</s>`; labels on the answers and </s>."""
    rec = {"id": "r", "source": "t", "turns": [
        {"role": "user", "content": [{"image": "x.jpg", "codes": CODES}, {"text": "What is it?"}]},
        {"role": "assistant", "content": [{"text": "A cat."}]},
        {"role": "user", "content": [{"text": "Which colour?"}]},
        {"role": "assistant", "content": [{"text": "Black."}]}]}
    s = SeedLlamaSequenceBuilder(tokenizer, max_length=512, chat_format="vicuna")(rec)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts = [(_enc(tokenizer, "USER: "), False), (_image_ids(tokenizer), False),
             (_enc(tokenizer, "What is it?\nASSISTANT:"), False), (_enc(tokenizer, "A cat."), True),
             (_enc(tokenizer, "\nUSER: Which colour?\nASSISTANT:"), False), (_enc(tokenizer, "Black."), True)]
    ids = [bos] + [i for p, _ in parts for i in p] + [eos]
    labels = [IGNORE_INDEX] + [i if sup else IGNORE_INDEX for p, sup in parts for i in p] + [eos]
    assert s["input_ids"].tolist() == ids
    assert s["labels"].tolist() == labels
    prompt = SeedLlamaSequenceBuilder(tokenizer, max_length=512, chat_format="vicuna").prompt(
        {**rec, "turns": rec["turns"][:3]})
    assert tokenizer.decode(prompt["input_ids"]).endswith("Which colour?\nASSISTANT:")


@pytest.mark.unit
def test_text_to_image_sft_form_supervises_response_and_image(tokenizer):
    """Official `USER: {prompt k} {caption}{. or ?}\\nASSISTANT:{response k}<img>...</img></s>`."""
    rec = {"id": "pair", "source": "t", "turns": [
        {"role": None, "content": [{"image": "x.jpg", "codes": CODES}, {"text": "a dog on the grass."}]}]}
    b = SeedLlamaSequenceBuilder(tokenizer, max_length=512, chat_format="vicuna", t2i_chat_format="vicuna",
                                 gen_prompts=True)
    seen = set()
    for draw in range(40):
        s = b(rec, t2i=True, draw=(0, draw))
        text = tokenizer.decode(s["input_ids"], skip_special_tokens=False)
        k = next(i for i, p in enumerate(SEED_LLAMA_GEN_PROMPTS) if f"USER: {p} a dog on the grass" in text)
        seen.add(k)
        punct = "?" if k >= 14 else "."
        ask = _enc(tokenizer, f"USER: {SEED_LLAMA_GEN_PROMPTS[k]} a dog on the grass{punct}\nASSISTANT:")
        answer = _enc(tokenizer, SEED_LLAMA_GEN_RESPONSES[k]) + _image_ids(tokenizer)
        eos = tokenizer.eos_token_id
        assert s["input_ids"].tolist() == [tokenizer.bos_token_id, *ask, *answer, eos]
        assert s["labels"].tolist() == [IGNORE_INDEX] * (1 + len(ask)) + answer + [eos]
    assert len(seen) > 5  # drawn per use


@pytest.mark.unit
def test_pretraining_caption_pairs_stay_documents(tokenizer):
    """Pre-training (t2i_chat_format plain): a flipped pair is caption + image, one supervised document."""
    rec = {"id": "pair", "source": "t", "turns": [
        {"role": None, "content": [{"image": "x.jpg", "codes": CODES}, {"text": "A red car."}]}]}
    s = SeedLlamaSequenceBuilder(tokenizer, max_length=512)(rec, t2i=True)
    want = [tokenizer.bos_token_id, *_enc(tokenizer, "A red car."), *_image_ids(tokenizer), tokenizer.eos_token_id]
    assert s["input_ids"].tolist() == want
    assert s["labels"].tolist() == [IGNORE_INDEX, *want[1:]]


# ---- released checkpoints and their tokenizer ---------------------------------------------------------------
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def _llama_folder(folder, tokenizer, seed=0):
    """An HF Llama folder (safetensors + config + tokenizer) sized to `tokenizer`, as a released one is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def _released_tokenizer():
    """seed-tokenizer-2's layout, but in an order nobody should assume: the markers first, codes reversed."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    names = ["<img>", "</img>", *(f"<img_{c:05d}>" for c in reversed(range(8192)))]
    tok.add_tokens([AddedToken(n, normalized=False, special=False) for n in names])
    return tok


@pytest.mark.unit
def test_released_folder_loads_with_image_ids_by_name(tmp_path):
    from tests.helpers import built_stage

    folder = tmp_path / "seed-llama-8b-sft"
    ref = _llama_folder(folder, _released_tokenizer())
    stage = built_stage("seed_llama_pretrain_tiny", tmp_path / "run", f"model.llm.weights={folder}",
                        f"model.llm.tokenizer={folder}", "model.llm.allow_random_init=false")
    vocab = stage.tokenizer.get_vocab()
    assert len(stage.tokenizer) == len(vocab) == 1000 + 8194  # nothing added: the folder has every token
    assert stage.mllm.code_ids == tuple(vocab[f"<img_{c:05d}>"] for c in range(8192))
    assert stage.mllm.code_ids[0] == 1000 + 2 + 8191  # code 0 is the last token added
    emb = stage.mllm.llm.get_input_embeddings().weight
    assert torch.equal(emb, ref.get_input_embeddings().weight)  # the released rows, none re-initialised
    ids = seed_llama_token_ids(stage.tokenizer)
    x = torch.tensor([[1, ids.img_start, *ids.code_ids(torch.tensor(CODES)).tolist(), ids.img_end, 2]])
    out = stage.mllm(input_ids=x, labels=x)
    with torch.no_grad():
        want = ref(input_ids=x).logits
    torch.testing.assert_close(out["logits"], want, rtol=1e-4, atol=1e-4)
    # the image part of the loss is over the 32 code targets, found by id
    ce = torch.nn.functional.cross_entropy(want[0, :-1], x[0, 1:], reduction="none")
    torch.testing.assert_close(out["loss_ce_image"], ce[1:33].mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("new_rows", ["normal", "mean"])
def test_new_vocabulary_rows_as_released(tmp_path, new_rows):
    """A text-only Llama: the 8194 new rows are normal(0, 0.02) by default (plain resize_token_embeddings, as
    SEED-LLaMA was trained); `mean` keeps SEED-X's init."""
    from transformers import AutoTokenizer

    from tests.helpers import built_stage

    folder = tmp_path / "vicuna"
    ref = _llama_folder(folder, AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True))
    overrides = [f"model.llm.weights={folder}", f"model.llm.tokenizer={folder}", "model.llm.allow_random_init=false"]
    if new_rows != "normal":
        overrides.append(f"stage.new_rows={new_rows}")
    stage = built_stage("seed_llama_pretrain_tiny", tmp_path / "run", *overrides)
    for got, old in ((stage.mllm.llm.get_input_embeddings().weight, ref.get_input_embeddings().weight),
                     (stage.mllm.llm.get_output_embeddings().weight, ref.get_output_embeddings().weight)):
        assert got.shape[0] == 1000 + 8194
        assert torch.equal(got[:1000], old)
        new = got[1000:].float()
        if new_rows == "normal":
            assert abs(new.mean().item()) < 1e-3 and abs(new.std().item() - 0.02) < 5e-4
            assert not torch.equal(new[0], new[1])
        else:
            assert torch.equal(new[0], new[-1])


@pytest.mark.unit
def test_bad_new_rows_fails_naming_the_key(tmp_path):
    import hydra

    from tests.helpers import tiny_run_cfg

    with pytest.raises(Exception, match=r"stage\.new_rows: expected one of"):
        hydra.utils.instantiate(tiny_run_cfg("seed_llama_pretrain_tiny", tmp_path, ["stage.new_rows=zeros"]).stage,
                                _convert_="all")


# ---- the 8B recipe ------------------------------------------------------------------------------------------
@pytest.mark.config
def test_8b_recipe_is_vicuna_7b_with_the_released_optimiser():
    from src.inspect import build_on_meta, count_parameters
    from tests.helpers import compose_cfg

    pre, sft = compose_cfg("seed_llama_8b_pretrain"), compose_cfg("seed_llama_8b_sft")
    assert (sft.data.chat_format, sft.data.t2i_chat_format, sft.data.gen_prompts) == ("vicuna", "vicuna", True)
    assert (pre.data.chat_format, pre.data.t2i_chat_format, pre.data.gen_prompts) == ("vicuna", "plain", False)
    o = pre.stage.optimizer
    assert (o.lr, list(o.betas), o.eps, o.weight_decay) == (1.5e-4, [0.9, 0.95], 1e-5, 0.05)
    assert pre.stage.scheduler.min_lr_ratio == 0.05 and pre.stage.new_rows == "normal"
    assert (sft.stage.optimizer.lr, list(sft.stage.optimizer.betas), sft.stage.scheduler.min_lr_ratio) == (
        1e-4, [0.9, 0.95], 0.1)
    counts = count_parameters(build_on_meta(pre))
    lora = 32 * (4 * 2 * 4096 * 16 + 2 * (4096 + 11008) * 16 + (11008 + 4096) * 16)
    vocab = 32000 + 8192 + 2
    llama_7b = 6_738_415_616 + 2 * (vocab - 32000) * 4096  # LLaMA-7B at 32000 rows, + the new rows in and out
    assert counts["total"] == llama_7b + lora
    assert counts["trainable"] == lora + 2 * vocab * 4096 + (2 * 32 + 1) * 4096  # + embeddings, lm_head, norms


# ---- generation ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_reply_pieces_keep_interleaved_images_with_exactly_32_codes(tokenizer):
    from src.pipelines.seed_llama import reply_pieces

    ids = seed_llama_token_ids(tokenizer)

    def code(cs):
        return ids.code_ids(torch.tensor(cs)).tolist()

    good, other = list(range(32)), list(range(8160, 8192))
    reply = (_enc(tokenizer, "Here is a cat.") + _image_ids(tokenizer, good) + _enc(tokenizer, "And a dog.")
             + [ids.img_start, *code(good[:31]), ids.img_end]  # 31 codes: rejected
             + [ids.img_start, *code(good[:16]), *_enc(tokenizer, "x")[:1], *code(good[:15]), ids.img_end]  # text
             + _image_ids(tokenizer, other) + [ids.img_start, *code(good)])  # no </img>: still 32 codes
    pieces, rejected = reply_pieces(reply, ids, tokenizer)
    assert pieces == [("text", "Here is a cat."), ("image", good), ("text", "And a dog."), ("image", other),
                      ("image", good)]
    assert rejected == 2
    assert reply_pieces([ids.img_start, *code(good), *code([5]), ids.img_end], ids, tokenizer) == ([], 1)


@pytest.fixture(scope="module")
def tiny_seed_llama(tmp_path_factory):
    from tests.helpers import built_stage

    return built_stage("seed_llama_pretrain_tiny", tmp_path_factory.mktemp("sl"))


def _generator(stage, chat_format="vicuna"):
    from src.pipelines.seed_llama import SeedLlamaGenerator

    builder = SeedLlamaSequenceBuilder(stage.tokenizer, max_length=512, chat_format=chat_format)
    return SeedLlamaGenerator(stage.mllm.llm, stage.tokenizer, builder, images=None), builder


def _prompts(builder):
    turns = [[{"role": "user", "content": [{"text": "hi"}]}],
             [{"role": "user", "content": [{"image": "x.jpg", "codes": CODES}, {"text": "What is in this picture?"}]}],
             [{"role": "user", "content": [{"text": "a"}]}, {"role": "assistant", "content": [{"text": "b c"}]},
              {"role": "user", "content": [{"text": "draw a long red road"}]}]]
    return [builder.prompt({"id": f"r{k}", "source": "t", "turns": t})["input_ids"].tolist()
            for k, t in enumerate(turns)]


@pytest.mark.unit
def test_free_decoding_is_the_model_s_own_greedy_reply_and_batching_changes_nothing(tiny_seed_llama):
    from src.pipelines.mllm import DecodingOptions

    gen, builder = _generator(tiny_seed_llama)
    prompts = _prompts(builder)
    opts = DecodingOptions(max_new_tokens=12)
    alone = [gen.generate([p], "chat", opts, [torch.Generator()])[0] for p in prompts]
    batched = gen.generate(prompts, "chat", opts, [torch.Generator() for _ in prompts])
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    llm = tiny_seed_llama.mllm.llm
    for p, r in zip(prompts, alone):  # unconstrained: what transformers' greedy search gives (no stop text hit)
        want = llm.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=gen.eos,
                            pad_token_id=gen.pad)[0, len(p):].tolist()
        if gen._stopped_at(want) is None:
            assert r.token_ids == want


@pytest.mark.unit
def test_t2i_forces_one_image_of_32_codes_per_row_batched(tiny_seed_llama):
    from src.pipelines.mllm import DecodingOptions

    gen, builder = _generator(tiny_seed_llama)
    ids = gen.ids
    opts = DecodingOptions(max_new_tokens=4, do_sample=True, temperature=1.0, top_p=0.5)
    replies = gen.generate(_prompts(builder), "t2i", opts, [torch.Generator().manual_seed(k) for k in range(3)])
    for r in replies:
        assert r.token_ids[0] == ids.img_start and r.token_ids[-1] == ids.img_end and len(r.token_ids) == 34
        assert [k for k, _ in r.pieces] == ["image"] and len(r.codes) == 32 and r.rejected_images == 0
        assert ids.code_ids(torch.tensor(r.codes)).tolist() == r.token_ids[1:-1]


@pytest.mark.unit
def test_a_reply_ends_where_the_next_user_turn_starts(tiny_seed_llama):
    gen, _ = _generator(tiny_seed_llama)
    reply = _enc(gen.tokenizer, "Sure.") + _enc(gen.tokenizer, "\nUSER:")
    cut = gen._stopped_at(reply)
    assert cut is not None and "USER" not in gen.tokenizer.decode(reply[:cut])
    assert _generator(tiny_seed_llama, "llama2")[0].stop_text == "[INST]"


@pytest.mark.unit
def test_seed_decode_defaults_are_the_released_unclip_settings(tmp_path):
    from src.pipelines.seed_decode import DEFAULT_GUIDANCE
    from src.pipelines.seed_llama import SeedDecodeOptions
    from tests.helpers import compose_cfg

    for e in ("seed_llama_8b_sft", "seed_llama_pretrain", "seed_tokenizer_v2", "seed_llama_sft_tiny"):
        cfg = compose_cfg(e, tmp_path, ["mode=t2i"], config_name="generate")
        d = SeedDecodeOptions.of(cfg.seed_decode)
        assert (d.steps, d.guidance_scale, d.noise_level) == (20, None, 0), e
    assert SeedDecodeOptions.of(None) == SeedDecodeOptions() and DEFAULT_GUIDANCE["unclip"] == 10.0
    with pytest.raises(ValueError, match="seed_decode: unknown keys"):
        SeedDecodeOptions.of({"step": 3})
    with pytest.raises(ValueError, match="seed_decode.steps"):
        SeedDecodeOptions.of({"steps": 0})


@pytest.mark.smoke
def test_draw_decodes_with_the_released_settings_by_default(tmp_path):
    from src.pipelines.seed_decode import build_decode_pipeline, decode_embeddings
    from src.pipelines.seed_llama import SeedImages
    from src.specs.inference import build_image_tokenizer

    tok = build_image_tokenizer(None, "seed_tokenizer_v2_tiny")
    pipe = build_decode_pipeline(tok.decoder_cfg, torch.device("cpu"), torch.float32)
    got = SeedImages(tok, lambda: pipe).draw(CODES, seed=3)
    embeds = tok.codec.decode_codes(torch.tensor([CODES]))
    want = decode_embeddings(pipe, "unclip", embeds, steps=20, guidance_scale=10.0, noise_level=0, seed=3)[0]
    other = decode_embeddings(pipe, "unclip", embeds, steps=50, guidance_scale=7.5, noise_level=0, seed=3)[0]
    assert got.tobytes() == want.tobytes() and got.tobytes() != other.tobytes()


@pytest.mark.smoke
def test_generate_answers_multi_turn_requests_in_batches(tmp_path):
    import json

    from omegaconf import OmegaConf

    from src.generate import generate
    from tests.helpers import compose_cfg

    photo = ROOT / "assets" / "sample" / "images" / "coffee.jpg"
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "two", "turns": [{"role": "user", "content": [{"image": str(photo)}, {"text": "What is it?"}]},
                                {"role": "user", "content": [{"text": "And the colour?"}]}]},
        {"id": "one", "turns": [{"role": "user", "content": [{"text": "hello"}]}]},
        {"id": "three", "turns": [{"role": "user", "content": [{"text": "a"}]},
                                  {"role": "user", "content": [{"text": "b"}]},
                                  {"role": "user", "content": [{"text": "c"}]}]}]))

    def run(batch_size):
        cfg = compose_cfg("seed_llama_8b_sft_tiny", tmp_path / f"b{batch_size}", [
            "mode=chat", f"requests={requests}", f"batch_size={batch_size}", "generate.max_new_tokens=5",
            "image_tokenizer.experiment=seed_tokenizer_v2_tiny", "seed_decode.steps=2", "progress=false"],
            config_name="generate")
        OmegaConf.resolve(cfg)
        return generate(cfg)

    results = run(2)
    assert [r["id"] for r in results] == ["two", "one", "three"]
    assert [len(r["replies"]) for r in results] == [2, 1, 3]
    for r in results:
        assert r["text"] == r["replies"][-1]["text"]
        assert all(len(c) == 32 for reply in r["replies"] for c in reply["codes"])
    assert run(1) == [{**r, "replies": [{**x, "images": [p.replace("/b2/", "/b1/") for p in x["images"]]}
                                        for x in r["replies"]],
                       "image": r["image"] and r["image"].replace("/b2/", "/b1/")} for r in results]


# ---- export -------------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_seed_tokenizer_exports_one_safetensors_file_with_the_released_names(tmp_path):
    import json

    from safetensors import safe_open

    from data_prep.convert_seed_tokenizer import convert
    from src.data.images import vit_view
    from src.export import export
    from src.specs.inference import build_image_tokenizer
    from tests.helpers import trained_tiny_stage

    stage, ckpt = trained_tiny_stage("seed_tokenizer_v2_tiny", tmp_path)
    out = export(str(ckpt), tmp_path / "export", dtype="fp32")
    path = out / "seed_tokenizer" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    for name in ("quantize.embedding.weight", "query_tokens", "ln_vision.weight", "encode_task_layer.0.weight",
                 "decode_task_layer.0.weight", "Qformer.bert.embeddings.LayerNorm.weight",
                 "Qformer.bert.encoder.layer.0.attention.self.query.weight",
                 "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "pos_embed_image",
                 "blocks_image.0.attn.qkv.weight", "image_down.0.weight", "distill_image_proj.weight",
                 "visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.cls_token"):
        assert name in keys, name
    assert not any(k.startswith(("target.", "vit.", "qformer.", "codec.")) for k in keys)
    assert json.loads(meta["seed_tokenizer_hparams"])["model"]["seed_codec"] == stage.hparams["model"]["seed_codec"]
    # the released-name file converts back (data_prep.convert_seed_tokenizer) to the very same tokenizer
    checkpoint, _ = convert(str(path), None, "seed_tokenizer_v2_tiny")
    own = {k: v for k, v in stage.state_dict().items() if not k.startswith("target.")}
    assert checkpoint["state_dict"].keys() == own.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in own.items())
    torch.save(checkpoint, tmp_path / "back.ckpt")
    back = build_image_tokenizer(str(tmp_path / "back.ckpt"), None)
    from PIL import Image

    view = vit_view(Image.open(ROOT / "assets/sample/images/coffee.jpg").convert("RGB"), 56)[None]
    assert torch.equal(back.codes_of(view), stage.codes_of(view))


@pytest.mark.smoke
def test_seed_llama_exports_hf_folder_and_peft_adapter(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.export import export
    from tests.helpers import trained_tiny_stage

    stage, ckpt = trained_tiny_stage("seed_llama_8b_sft_tiny", tmp_path)
    out = export(str(ckpt), tmp_path / "export", dtype="fp32", chat_format="vicuna")
    merged = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "llm", local_files_only=True)
    assert len(tok) == len(stage.tokenizer) == merged.get_input_embeddings().weight.shape[0]
    assert seed_llama_token_ids(tok) == seed_llama_token_ids(stage.tokenizer)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("USER: hi\nASSISTANT:")
    ids = torch.randint(0, len(tok), (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = stage.mllm.llm(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        adapted = AutoPeftModelForCausalLM.from_pretrained(str(out / "lora"), local_files_only=True).eval()
        torch.testing.assert_close(adapted(input_ids=ids).logits, want, atol=1e-5, rtol=0)
