"""SEED-X MLLM: packing isolation, CE + MSE overfit, full-size counts on meta, official agent keys."""

import json
import math

import hydra
import pytest
import torch

from src.data.mllm_collate import MLLMCollator
from src.inspect import build_on_meta, count_parameters
from src.train import train
from tests.helpers import compose_cfg, tiny_run_cfg

LLAMA2_13B_PARAMS = 13_015_864_320
NEW_TOKENS = 330


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny stage module + datamodule, built once for the module's tests."""
    cfg = tiny_run_cfg("seedx_pretrain_tiny", tmp_path_factory.mktemp("mllm"))
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.configure_model()
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    return module, dm


def good_samples(dm, n, **record_filter):
    out = []
    for i in range(len(dm.train_set)):
        s = dm.train_set[i]
        if "skipped" not in s:
            out.append(s)
        if len(out) == n:
            break
    return out


@pytest.mark.unit
def test_packed_pair_gives_the_same_logits_as_each_sample_alone(tiny):
    module, dm = tiny
    module.eval()
    s1, s2 = good_samples(dm, 2)
    padded = MLLMCollator(dm.tokenizer.pad_token_id, 4096, packing=False, vit_image_size=dm.vit_image_size)
    packed = MLLMCollator(dm.tokenizer.pad_token_id, 4096, packing=True, vit_image_size=dm.vit_image_size)

    def logits(batch):
        with torch.no_grad():
            return module.mllm(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch["position_ids"], ids_cmp_mask=batch["ids_cmp_mask"],
                ids_gen_mask=batch["ids_gen_mask"], image_embeds=module.image_embeds(batch),
                embeds_cmp_mask=batch["embeds_cmp_mask"], embeds_gen_mask=batch["embeds_gen_mask"],
                patch_positions=batch["patch_positions"],
            )["logits"]

    alone = {s["id"]: logits(padded([s]))[0] for s in (s1, s2)}
    batch = packed([s1, s2])
    assert batch["input_ids"].shape[0] == 1 and batch.get("attention_mask") is None
    row = logits(batch)[0]
    start = 0
    for sid in batch["ids"]:
        n = alone[sid].shape[0]
        torch.testing.assert_close(row[start:start + n], alone[sid], atol=2e-5, rtol=1e-4)
        start += n
    assert start == len(s1["input_ids"]) + len(s2["input_ids"])


@pytest.mark.smoke
def test_overfitting_one_batch_lowers_ce_and_mse_together(tiny):
    module, dm = tiny
    torch.manual_seed(0)
    samples = good_samples(dm, 8)
    batch = dm.collator(samples)
    assert batch["embeds_gen_mask"].any() and (batch["labels"] != -100).any()
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    first = module.compute_losses(batch, "train")
    for _ in range(30):
        losses = module.compute_losses(batch, "train")
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = module.compute_losses(batch, "train")
    assert last["loss_ce"] < 0.7 * first["loss_ce"], (first["loss_ce"], last["loss_ce"])
    assert last["loss_mse"] < 0.7 * first["loss_mse"], (first["loss_mse"], last["loss_mse"])


@pytest.mark.smoke
def test_tiny_pretrain_writes_ce_and_mse(tmp_path):
    train(tiny_run_cfg("seedx_pretrain_tiny", tmp_path, ["trainer.max_steps=5"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("train/loss", "train/loss_ce", "train/loss_mse"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/loss_mse"] > 0 and metrics["train/loss_ce"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    probes = (tmp_path / "samples" / "probe.jsonl").read_text().splitlines()
    assert "caption" in json.loads(probes[-1]) and "probe_mse" in json.loads(probes[-1])


@pytest.mark.config
def test_full_size_counts_on_meta():
    module = build_on_meta(compose_cfg("seedx_pretrain"))
    counts = count_parameters(module)
    m = counts["modules"]
    llm = m["mllm.llm"]["total"] - counts["lora_trainable"]
    assert llm == LLAMA2_13B_PARAMS + NEW_TOKENS * 5120 * 2  # new input + lm_head rows
    assert m["mllm.input_resampler"]["total"] == 126_525_440
    assert m["mllm.output_resampler"]["total"] == 88_637_440
    per_layer = 4 * 32 * (5120 + 5120) + 3 * 32 * (5120 + 13824)  # LoRA r=32 on q,k,v,o,gate,up,down
    assert counts["lora_trainable"] == 40 * per_layer
    assert m["vit"]["trainable"] == 0


@pytest.mark.parity
def test_agent_state_dict_matches_official_keys(reference_dir):
    module = build_on_meta(compose_cfg("seedx_pretrain"))
    ref = json.loads((reference_dir / "seedx_agent_keys.json").read_text())["params"]
    own = {k: list(v.shape) for k, v in module.mllm.state_dict().items() if not k.startswith("llm.")}
    assert own == ref


@pytest.mark.config
def test_lora_and_full_finetune_together_fail_before_build(tmp_path):
    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path, ["stage.full_finetune=true"])
    with pytest.raises(Exception, match="full_finetune"):
        hydra.utils.instantiate(cfg.stage, _convert_="all")
