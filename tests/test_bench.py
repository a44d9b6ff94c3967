"""Throughput/MFU: the analytic FLOPs formula, the ThroughputMonitor callback, and that src.bench runs.

Speed is never asserted here (shared machines are noisy): `make bench` measures it.
"""

import json
import math

import hydra
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from src.utils.flops import (
    llama_train_flops,
    peak_flops_for,
    resampler_forward_flops,
    sequence_stats,
    vit_forward_flops,
)
from tests.helpers import SMALL_MLLM, tiny_run_cfg

# L=1 layer, d=4, MLP f=8, 2 heads of 2 (no GQA), vocab 10.
HAND_LLAMA = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 10}
PERF_KEYS = ("perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s", "perf/data_wait_fraction",
             "perf/peak_mem_gb", "perf/mfu")

# torch's FlopCounterMode has no formula for the CPU flash-attention kernels: give it the CUDA ones.
_aten = torch.ops.aten
CPU_SDPA = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda go, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(go, q, k, v),
}


@pytest.mark.unit
def test_llama_flops_by_hand():
    # Two sequences of 3 and 2 tokens: T = 5, Σs² = 9 + 4 = 13.
    # Per layer q, k, v, o: 4·4 each = 64; gate, up, down: 4·8 each = 96 -> P_lin = 160; lm_head 4·10 = 40.
    # LoRA r=1 on q_proj and v_proj: (4+4) + (4+4) = 16.
    # forward  = 2·5·(160+40+16) + 4·1·4·13          = 2160 + 208 = 2368
    # backward = activation grads 2160 + 2·208 = 2576, weight grads 2·5·(16 + 40) = 560
    lora = llama_train_flops(HAND_LLAMA, 5, 13, lora_r=1, lora_targets=("q_proj", "v_proj"))
    assert lora == 2368 + 2576 + 560 == 5504
    assert llama_train_flops(HAND_LLAMA, 5, 13, lora_r=1, lora_targets=("q_proj", "v_proj"), backward=False) == 2368
    # Everything trainable: the familiar 6·N·T + 12·L·d·Σs² = 6·5·200 + 12·4·13 = 6624.
    assert llama_train_flops(HAND_LLAMA, 5, 13, trainable="full") == 6624
    # Frozen LLM with a trainable resampler below it: forward + activation grads, no weight grads.
    assert llama_train_flops(HAND_LLAMA, 5, 13, trainable="none") == 2208 + 2416
    # Resampler, 4 queries over 9 tokens of width 6 -> 8: kv_proj 2·9·6·8 = 864, q 2·4·64 = 512,
    # k+v 4·9·64 = 2304, scores+AV 4·4·9·8 = 1152, out_proj 512.
    assert resampler_forward_flops(4, 9, 8, 6) == 864 + 512 + 2304 + 1152 + 512
    with pytest.raises(ValueError, match="LoRA targets"):
        llama_train_flops(HAND_LLAMA, 5, 13, lora_r=1, lora_targets=("qkv",))


@pytest.mark.unit
def test_sequence_stats_padded_and_packed():
    padded = {"attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "num_tokens": 5}
    tokens, sq = sequence_stats(padded, pad_token_id=0)
    assert tokens == 5 and float(sq) == 3**2 + 2**2
    # Packed rows: samples of 3 and 2 tokens + a 1-token pad tail; a 2-token sample + a 4-token pad tail.
    packed = {
        "attention_mask": None,
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 0, 0, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]),
    }
    tokens, sq = sequence_stats(packed, pad_token_id=0)
    assert float(tokens) == 7 and float(sq) == 9 + 4 + 4


@pytest.mark.unit
def test_peak_table_is_dense_bf16_and_specific_first():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_flops_for("Some Future GPU") is None


@pytest.mark.unit
def test_llama_lora_flops_match_torch_flop_counter():
    """Eager attention so the counter sees the s x s matmuls; base frozen, LoRA + lm_head + embeddings train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.models.mllm import apply_lora

    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 300}
    llm = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).requires_grad_(False)
    targets = ("q_proj", "v_proj", "down_proj")
    llm = apply_lora(llm, 4, 4, 0.0, targets)
    ids = torch.randint(0, 300, (1, 37))
    with FlopCounterMode(display=False) as counter:
        llm(input_ids=ids).logits.sum().backward()
    assert counter.get_total_flops() == llama_train_flops(cfg, 37, 37**2, lora_r=4, lora_targets=targets)


@pytest.mark.unit
def test_mllm_stage_flops_match_torch_flop_counter(tmp_path):
    """The stage's flops_per_batch vs a counted training step of the tiny MLLM (one sample: no padding)."""
    from src.models.qwen_vit import QwenViT, QwenViTConfig

    vit_cfg = QwenViTConfig.tiny()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        QwenViT(vit_cfg)(torch.randn(3, 3, 56, 56))
    assert counter.get_total_flops() == 3 * vit_forward_flops(vit_cfg)

    # edit pairs hold both a comprehension view and a generation target (pre-training mixes them in only by choice)
    cfg = tiny_run_cfg("seedx_pretrain_tiny", tmp_path, ["model.llm.attn_implementation=eager",
                                                          "data=mllm_pretrain_with_edit"])
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.configure_model()
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    # A sample with a comprehension view and a generation target (no zero-weight dummy resampler pass).
    sample = next(s for s in (dm.train_set[i] for i in range(len(dm.train_set)))
                  if "skipped" not in s and s["embeds_cmp_mask"].any() and s["embeds_gen_mask"].any())
    batch = dm.collator([sample])
    module.train()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        module.compute_losses(batch, "train")["loss"].backward()
    analytic = float(module.flops_per_batch(batch))
    # Left out on purpose: norms, losses, pos-emb interpolation, the input resampler's unneeded dX (~1%).
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.03)


@pytest.mark.smoke
def test_throughput_monitor_logs_perf_keys(tmp_path):
    from src.train import train

    train(tiny_run_cfg("seedx_pretrain_tiny", tmp_path, [
        *SMALL_MLLM, "trainer.max_steps=3", "callbacks.mllm_probe=null", "callbacks.throughput.log_every_n_steps=1",
        "callbacks.throughput.peak_flops=1e12",
    ]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in PERF_KEYS:
        assert key in metrics and math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics.get(key))
    assert 0 < metrics["perf/data_wait_fraction"] < 1
    assert metrics["perf/tokens_per_s"] > metrics["perf/samples_per_s"]
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "perf/mfu" in header and "perf/step_time_s" in header


@pytest.mark.smoke
@pytest.mark.slow  # every part of `make bench` at its smallest, two init ranks included (~1 CPU-minute)
def test_bench_runs_and_writes_its_keys(tmp_path, capsys):
    from src.bench import main

    main(["--out", str(tmp_path), "--steps", "2", "--trials", "1", "--warmup", "1", "--data-batches", "2",
          "--peak-flops", "1e11", "--init-size", "tiny", "--detok-init-size", "tiny",
          "--no-features"])  # features: its own test below
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in ("lightning_vs_bare", "data_vs_model", "packed_vs_padded", "mfu", "lightning_step_s",
                "bare_step_s", "data_samples_per_s", "packed_tokens_per_s", "padded_tokens_per_s",
                "init_peak_rss_gb_per_rank", "full_model_gb", "init_rss_over_full",
                "detok_init_peak_rss_gb_per_rank", "detok_full_model_gb", "detok_init_rss_over_full",
                "data_samples_per_s_per_worker_fullres"):
        for where in (last, saved):
            assert isinstance(where[key], float) and math.isfinite(where[key]) and where[key] > 0, (key, where[key])
    # The tiny twin's parameters (each rank holds half) against the full model: half, in bytes.
    assert saved["init_local_model_gb_per_rank"] < 0.55 * saved["full_model_gb"]
    assert saved["detok_init_local_model_gb_per_rank"] < 0.55 * saved["detok_full_model_gb"]
    table = (tmp_path / "bench.md").read_text()
    assert "lightning_vs_bare" in table and "<= 1.05" in table and ">= 3" in table and "<= 0.75" in table


@pytest.mark.smoke
def test_feature_store_vs_live_runs_at_tiny_size(tmp_path):
    """The bench key exists and is finite (its value is measured by `make bench`, never asserted)."""
    from src.bench import EXPERIMENT, compose_bench_cfg
    from src.bench_features import feature_store_vs_live

    cfg = compose_bench_cfg(tmp_path, "tiny", "cpu")
    result = feature_store_vs_live(cfg, EXPERIMENT, [], tmp_path, rounds=1, steps=1, warmup=0)
    for key in ("feature_store_vs_live", "feature_store_samples_per_s", "feature_live_samples_per_s",
                "feature_store_bytes_per_sample"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["feature_store_batch_size"] == cfg.data.batch_size
