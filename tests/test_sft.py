"""Instruction tuning: chat loss masks, the pre-trained start (init_from: resamplers arrive unchanged, the
pre-training LoRA merged or kept gives the pre-trained model's outputs), malformed conversations skipped
with their line, and the five experiments on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.data.mllm import MLLMDataModule
from src.data.mllm_sequence import IGNORE_INDEX, SeedXSequenceBuilder
from src.inspect import build_on_meta, count_parameters
from src.models.vocab import image_token_ids
from src.stages.mllm_sft import MergedLoRA
from src.utils.materialize import HeldTensor
from tests.helpers import compose_cfg, lean_checkpoint, perturb_trainable, tiny_run_cfg, trained_tiny_mllm

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "tokenizers" / "tiny-llama"
TASKS = ["i", "edit", "ppt", "story", "tryon"]


@pytest.fixture(scope="module")
def tokenizer():
    from src.data.mllm import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


# ---- loss masks -----------------------------------------------------------------------------------------
def test_two_turn_chat_masks_ce_on_assistant_turns_and_mse_on_the_generated_image(tokenizer, tmp_path):
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "in.png")
    Image.new("RGB", (28, 28), (10, 10, 200)).save(tmp_path / "out.png")
    record = {"id": "t/0", "source": "t", "_base_dir": str(tmp_path), "turns": [
        {"role": "user", "content": [{"image": "in.png", "grid": "1x1"}, {"text": "What colour?"}]},
        {"role": "assistant", "content": [{"text": "Red. Here it is in blue:"}, {"image": "out.png", "generate": True}]},
        {"role": "user", "content": [{"text": "Thanks."}]},
        {"role": "assistant", "content": [{"text": "You are welcome."}]}]}
    b = SeedXSequenceBuilder(tokenizer, vit_image_size=28, chat_format="llama2")
    s = b(record)
    ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
    tok = image_token_ids(tokenizer)

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    n = 64
    user_image = [tok.patch_start, *tok.img[:n], tok.patch_end, tok.img_start, *tok.img[:n], tok.img_end]
    gen_image = [tok.img_start, *tok.img[:n], tok.img_end]
    first_user = [*user_image, *enc("What colour? [/INST]\n")]
    expected = [tokenizer.bos_token_id, *enc("[INST] "), *first_user, *enc("Red. Here it is in blue:"), *gen_image,
                *enc("\n[INST] Thanks. [/INST]\n"), *enc("You are welcome."), tokenizer.eos_token_id]
    assert ids == expected
    # CE exactly on the assistant text, the <img> that opens the generated image, and </s>
    a1 = 1 + len(enc("[INST] ")) + len(first_user)
    a1_end = a1 + len(enc("Red. Here it is in blue:"))
    a2 = a1_end + len(gen_image) + len(enc("\n[INST] Thanks. [/INST]\n"))
    want = {*range(a1, a1_end), a1_end, *range(a2, len(ids))}
    assert {i for i, lab in enumerate(labels) if lab != IGNORE_INDEX} == want
    assert all(labels[i] == ids[i] for i in want)
    # comprehension: the 2 x 64 slots of the user image (tile + global view); MSE: the 64 generated slots
    cmp = [i for i, m in enumerate(s["ids_cmp_mask"].tolist()) if m]
    gen = [i for i, m in enumerate(s["ids_gen_mask"].tolist()) if m]
    start = 1 + len(enc("[INST] "))
    assert cmp == [*range(start + 1, start + 1 + n), *range(start + n + 3, start + 2 * n + 3)]
    assert gen == list(range(a1_end + 1, a1_end + 1 + n))
    assert s["embeds_cmp_mask"].tolist() == [True, True, False]
    assert s["embeds_gen_mask"].tolist() == [False, False, True]


# ---- the pre-trained start --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'trained' tiny seedx_pretrain stage and its lean checkpoint, as src.train writes it."""
    return trained_tiny_mllm(tmp_path_factory.mktemp("pretrain"))


def _sft(tmp_path, init_from, *overrides):
    cfg = tiny_run_cfg("seedx_sft_edit_tiny", tmp_path, [f"stage.init_from={init_from}", *overrides])
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    stage.build_models(load_weights=True)
    return stage.eval()


def _logits(stage, ids):
    with torch.no_grad():
        return stage.mllm.llm(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["merge", "keep"])
def test_init_from_loads_the_pretrained_model_before_the_first_step(pretrained, mode, tmp_path):
    pre, ckpt = pretrained
    sft = _sft(tmp_path, ckpt, f"stage.pretrain_lora={mode}")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    # the resamplers and patch positions arrive exactly as trained
    own = sft.state_dict()
    for k in [k for k in state if k.startswith(("mllm.input_resampler.", "mllm.output_resampler.", "mllm.patch_pos"))]:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=k)
    assert any(k.startswith("mllm.input_resampler.") for k in state)
    # a fresh task LoRA (B = 0, so it changes nothing yet) on the pre-trained function
    task_b = [p for n, p in sft.mllm.llm.named_parameters() if ".lora_B.default." in n]
    assert task_b and all(bool((p == 0).all()) and p.requires_grad for p in task_b)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(sft, ids), _logits(pre, ids), rtol=1e-4, atol=1e-4)
    kept = [(n, p) for n, p in sft.mllm.llm.named_parameters() if ".pretrain." in n]
    if mode == "keep":
        assert kept and not any(p.requires_grad for _, p in kept)
        q = "base_model.model.model.layers.0.self_attn.q_proj"
        torch.testing.assert_close(dict(kept)[f"{q}.lora_A.pretrain.weight"],
                                   state[f"mllm.llm.{q}.lora_A.default.weight"], rtol=0, atol=0)
    else:
        assert not kept
    # what trains: the task LoRA, resamplers, patch positions, embeddings / norms / lm_head -- not the base
    trainable = {n for n, p in sft.named_parameters() if p.requires_grad}
    assert any(".lora_A.default." in n for n in trainable)
    assert {"mllm.patch_pos_embed"} <= trainable and not any(".base_layer." in n for n in trainable)


def test_init_from_a_sharded_checkpoint_dir_and_mismatches_name_the_key(pretrained, tmp_path):
    import torch.distributed.checkpoint as dcp

    pre, ckpt = pretrained
    meta = torch.load(ckpt, weights_only=False)
    shard_dir = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {k: v.clone() for k, v in pre.state_dict().items()}}, checkpoint_id=str(shard_dir),
             no_dist=True)
    torch.save({"hyper_parameters": meta["hyper_parameters"]}, shard_dir / "meta.pt")
    sft = _sft(tmp_path / "a", shard_dir)
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(sft, ids), _logits(pre, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj.*does not fit"):
        _sft(tmp_path / "b", ckpt, "model.llm.config.intermediate_size=96")
    with pytest.raises(ValueError, match="no place in this model.*patch_pos_embed"):
        _sft(tmp_path / "b", ckpt, "model.agent.add_patch_pos=false")
    with pytest.raises(FileNotFoundError, match="stage.init_from"):
        _sft(tmp_path / "c", tmp_path / "nope.ckpt")


def test_merged_lora_rows_equal_the_folded_weight():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    src = MergedLoRA(HeldTensor(w), a, b, 0.5)
    torch.testing.assert_close(torch.cat([src.rows(0, 4), src.rows(4, 6)]), w + 0.5 * b @ a)
    with pytest.raises(ValueError, match="does not fit"):
        MergedLoRA(HeldTensor(w), a, b[:5], 1.0)


def test_an_sft_checkpoint_rebuilds_for_generation_from_its_pretrained_start(pretrained, tmp_path):
    from src.specs.inference import build_mllm
    from src.specs.seedx import SeedXSFTRecipe

    _, ckpt = pretrained
    sft = _sft(tmp_path, ckpt)
    perturb_trainable(sft, 1)
    path = tmp_path / "sft.ckpt"
    lean_checkpoint(sft, path)
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    # from its own hyper-parameters (src.export), and from the experiment's stage config, which does not
    # restate init_from (src.generate): the checkpoint's start is rebuilt either way
    experiment_stage = OmegaConf.to_container(tiny_run_cfg("seedx_sft_edit_tiny", tmp_path).stage)
    for stage_cfg in (torch.load(path, weights_only=False)["hyper_parameters"], experiment_stage):
        rebuilt = build_mllm(stage_cfg, str(path))
        assert isinstance(rebuilt, SeedXSFTRecipe) and rebuilt.stage_name == "sft"  # the SFT model (src/specs)
        torch.testing.assert_close(_logits(rebuilt, ids), _logits(sft, ids), rtol=1e-5, atol=1e-5)
    # a resume that forgot init_from would build another base under the trained LoRA: refused, naming the key
    fresh = hydra.utils.instantiate(tiny_run_cfg("seedx_sft_edit_tiny", tmp_path / "x").stage, _convert_="all")
    fresh.build_models(load_weights=True)
    with pytest.raises(RuntimeError, match="stage.init_from="):
        fresh.on_load_checkpoint(torch.load(path, weights_only=False))


# ---- malformed conversations ------------------------------------------------------------------------------
def test_malformed_conversations_are_skipped_and_counted_with_their_line(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")

    def chat(rid, turns):
        return {"id": f"bad/{rid}", "source": "bad", "turns": turns}

    good = [{"role": "user", "content": [{"image": "ok.png"}, {"text": "Colour?"}]},
            {"role": "assistant", "content": [{"text": "Red."}]}]
    lines = [
        chat("good", good),
        chat("missing_image", [{"role": "user", "content": [{"image": "gone.png"}, {"text": "Colour?"}]},
                               {"role": "assistant", "content": [{"text": "?"}]}]),
        chat("empty", []),
        chat("robot", [{"role": "robot", "content": [{"text": "beep"}]}, good[1]]),
        chat("empty_turn", [{"role": "user", "content": []}, good[1]]),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dm = MLLMDataModule(str(TOKENIZER), [{"path": str(path), "kind": "jsonl"}], vit_image_size=28, batch_size=8,
                        samples_per_epoch=5, chat_format="llama2")
    dm.setup("fit")
    batch = dm.collator([dm.train_set[i] for i in range(len(dm.train_set))])
    assert batch["ids"] == ["bad/good"]
    skipped = {s.id: (s.reason, s.where) for s in batch["skipped"]}
    assert skipped["bad/missing_image"] == ("missing_file", f"{path}:2")
    assert {k: v[0] for k, v in skipped.items() if k != "bad/missing_image"} == {
        "bad/empty": "bad_schema", "bad/robot": "bad_schema", "bad/empty_turn": "bad_schema"}
    assert sorted(v[1] for v in skipped.values()) == [f"{path}:{i}" for i in (2, 3, 4, 5)]


# ---- experiments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_sft_experiments_pick_the_official_detokenizer_stage_and_compose(task, tmp_path):
    from src.pipelines.conversation import mode_of

    cfg = compose_cfg(f"seedx_sft_{task}", tmp_path)
    assert cfg.stage._target_ == "src.stages.mllm_sft.MLLMSFTModule"
    assert cfg.data.chat_format == "llama2"
    official = "stage2" if task in ("edit", "tryon") else "stage1"  # the official release's pairing
    assert cfg.callbacks.sft_samples.detokenizer == official == mode_of(cfg.callbacks.sft_samples.mode).detokenizer


def test_seedx_sft_edit_full_size_on_meta():
    module = build_on_meta(compose_cfg("seedx_sft_edit"))
    counts = count_parameters(module)
    llm = counts["modules"]["mllm.llm"]
    assert counts["modules"]["vit"]["trainable"] == 0
    # LoRA r32 on every projection of the 40 layers + embeddings, norms and lm_head of the 32330-token vocab
    lora = 40 * 32 * (4 * (5120 + 5120) + 3 * (5120 + 13824))
    trained_base = 2 * 32330 * 5120 + 5120 * (2 * 40 + 1)
    assert llm["trainable"] == lora + trained_base
    assert all(p.device.type == "meta" for p in module.parameters())


# ---- training ---------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("task", TASKS)
def test_tiny_sft_trains_three_steps_with_finite_ce_and_mse(task, tmp_path):
    from src.train import train

    train(tiny_run_cfg(f"seedx_sft_{task}_tiny", tmp_path, ["trainer.max_steps=3"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(written["train/loss_ce"])) and written["train/loss_ce"] > 0
    assert torch.isfinite(torch.tensor(written["train/loss_mse"])) and written["train/loss_mse"] > 0  # every task draws
    (results,) = (tmp_path / "samples").glob("*/step_0000003/results.jsonl")  # the task's sampling callback ran
    assert results.read_text().strip()


@pytest.mark.smoke
def test_sft_run_from_a_pretraining_checkpoint_starts_from_its_resamplers(pretrained, tmp_path):
    from src.train import train

    _, ckpt = pretrained
    at_start = tmp_path / "at_start.pt"
    train(tiny_run_cfg("seedx_sft_edit_tiny", tmp_path, [
        "trainer.max_steps=2", f"stage.init_from={ckpt}", "+callbacks.at_start._target_=tests.helpers.SaveStateAtStart",
        f"+callbacks.at_start.path={at_start}", "+callbacks.at_start.contains=resampler"]))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    seen = torch.load(at_start)
    keys = [k for k in state if "resampler" in k]
    assert keys and set(keys) <= set(seen)
    assert all(torch.equal(seen[k], state[k]) for k in keys)


@pytest.mark.parametrize("mode", ["merge", "keep"])
def test_an_sft_checkpoint_exports_a_merged_llm_that_equals_it(pretrained, mode, tmp_path):
    from transformers import AutoModelForCausalLM

    from src.export import export

    _, ckpt = pretrained
    sft = _sft(tmp_path, ckpt, f"stage.pretrain_lora={mode}")
    perturb_trainable(sft, 2)
    path = tmp_path / "sft.ckpt"
    lean_checkpoint(sft, path)
    out = export(str(path), tmp_path / "export", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, _logits(sft, ids), rtol=1e-4, atol=1e-4)
    assert (out / "lora").is_dir() == (mode == "merge")
    if mode == "merge":  # the adapter's base (pre-trained SEED-X, its LoRA merged) is written and recorded
        from peft import AutoPeftModelForCausalLM

        adapted = AutoPeftModelForCausalLM.from_pretrained(out / "lora", dtype=torch.float32).eval()
        assert adapted.peft_config["default"].base_model_name_or_path == str((out / "base").resolve())
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, _logits(sft, ids), rtol=1e-4, atol=1e-4)


def test_init_from_an_exported_folder_starts_from_the_exported_model(pretrained, tmp_path):
    from src.export import export

    pre, ckpt = pretrained
    out = export(str(ckpt), tmp_path / "export", dtype="fp32")
    sft = _sft(tmp_path, out)
    assert sft.init_from_export and sft.llm_cfg.weights == str(out / "llm")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(sft, ids), _logits(pre, ids), rtol=1e-4, atol=1e-4)
    for k, v in pre.mllm.state_dict().items():
        if k.startswith(("input_resampler.", "output_resampler.", "patch_pos")):
            torch.testing.assert_close(sft.mllm.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(sft.vit.state_dict()["proj"], pre.vit.state_dict()["proj"], rtol=0, atol=0)
