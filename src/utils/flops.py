"""Analytic model FLOPs of a training step (for MFU), and the dense peak FLOP/s of known GPUs.

Conventions (the usual ones for MFU, e.g. Megatron / PaLM App. B):

* one multiply-add = 2 FLOPs; only matmuls are counted (norms, softmax, RoPE, activations, losses and
  embedding lookups are left out: a few % at most);
* *model* FLOPs: activation recomputation (gradient checkpointing) is not counted, padding is not counted
  (tokens are the batch's non-pad tokens), and packed rows count attention per sample (block-diagonal),
  not per row;
* attention scores are counted over the full s x s square (causal masking is not discounted), as in
  Megatron / PaLM: ``QK^T`` and ``AV`` are ``2·s²·d`` each, so ``4·s²·d`` per layer per sequence;
* backward: a matmul ``Y = X W`` costs ``2·|X|·|W|``-ish forward; its backward needs ``dX = dY W^T``
  (same FLOPs again) whenever anything *below* it trains, and ``dW = X^T dY`` (same again) only when ``W``
  trains. So a frozen weight on a path that needs gradients (the Llama base weights under LoRA: the
  embeddings and input resampler below them train) costs forward + 1x, a trainable one forward + 2x, and
  attention (no weights, but grads for Q, K and V) forward + 2x. With everything trainable this is the
  familiar ``6·N·T + 12·L·d·Σs²``; ``6·N_trainable·T`` would be wrong under LoRA;
* frozen towers run under ``no_grad`` (the ViT): forward only.

SEED-X MLLM step (``mllm_step_flops``), with T non-pad tokens, s_i the length of each sample:

    Llama:  P_lin  = L·[d·(h·hd) + 2·d·(kv·hd) + (h·hd)·d + 3·d·f]      q, k, v, o, gate, up, down
            P_head = d·V                                                  lm_head
            P_lora = L·r·Σ_targets (d_in + d_out)                         A (d_in x r) + B (r x d_out)
            fwd    = 2·T·(P_lin + P_head + P_lora) + 4·L·(h·hd)·Σ s_i²
            bwd    = 2·T·(P_lin + P_head + P_lora) + 8·L·(h·hd)·Σ s_i²    (activation grads)
                   + 2·T·P_trainable                                      (weight grads)
            P_trainable = P_lora + P_head (LoRA) | P_lin + P_head (full fine-tune) | 0 (frozen LLM)
    ViT (frozen, per view, t = (S/p)² patches, width w, MLP m, pool to q queries of dim D):
            2·t·3p²·w + L_v·[2·t·(4w² + 2·w·m) + 4·t²·w] + resampler(q, t, D, w) + 2·q·D²
    resampler(q queries, n kv tokens, width d, kv width k), forward:
            2·n·k·d (kv_proj, when k != d) + 2·q·d² + 4·n·d² (in_proj q | k, v) + 4·q·n·d + 2·q·d² (out_proj)
    step    = n_views·ViT + 3·n_cmp·resampler_in(n=256) + 3·n_gen·resampler_out(n=64) + Llama

(the resamplers train: forward + backward ≈ 3x forward).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from src.data.batch import MLLMBatch

# Per-GPU *dense* (no 2:4 sparsity) bf16/fp16 tensor-core peaks, matched as substrings of the lower-cased
# torch.cuda.get_device_name(); first match wins (more specific names first). Sources: NVIDIA datasheets
# (H100/H200 SXM 989 TFLOP/s dense = 1979 with sparsity; PCIe 756; NVL 835; A100 312; L40S 362; L4 121).
# Lightning's table lists the *sparse* figure for H200, so it is only a fallback for GPUs not listed here.
PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989e12),
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800 pcie", 756e12),
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_flops_for(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s of one GPU by name for bf16/fp16 compute; None when unknown (or another dtype)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    for key, peak in PEAK_BF16_DENSE_FLOPS:
        if key in name:
            return peak
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Our dense table first, then Lightning's (other GPUs / fp32-tf32); None on CPU."""
    if device.type != "cuda":
        return None
    peak = peak_flops_for(torch.cuda.get_device_name(device), dtype)
    if peak is not None:
        return peak
    from lightning.fabric.utilities.throughput import get_available_flops

    found = get_available_flops(device, dtype)
    return float(found) if found else None


# ---- building blocks ------------------------------------------------------------------------------------
def llama_shapes(config: Mapping[str, Any], vocab_size: int | None = None) -> dict[str, int]:
    d = int(config["hidden_size"])
    h = int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or d // h)
    return {
        "layers": int(config["num_hidden_layers"]),
        "d": d,
        "f": int(config["intermediate_size"]),
        "h": h,
        "kv": int(config.get("num_key_value_heads") or h),
        "hd": hd,
        "vocab": int(vocab_size if vocab_size is not None else config["vocab_size"]),
    }


def llama_projection_shapes(s: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection of one Llama layer."""
    d, f, q, kv = s["d"], s["f"], s["h"] * s["hd"], s["kv"] * s["hd"]
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def llama_train_flops(
    config: Mapping[str, Any],
    tokens,
    sum_sq_lengths,
    *,
    vocab_size: int | None = None,
    lora_r: int = 0,
    lora_targets: Iterable[str] = LLAMA_PROJECTIONS,
    trainable: str = "lora",
    backward: bool = True,
) -> Any:
    """FLOPs of one Llama forward (+ backward) over `tokens` non-pad tokens in sequences of lengths s_i.

    `sum_sq_lengths` = Σ s_i². `trainable`: "lora" (adapters + lm_head train; base weights frozen but on the
    gradient path), "full" (everything), "none" (frozen LLM; activation grads still flow for the input
    resampler below it). Works on python numbers and on tensors (no host sync).
    """
    if trainable not in ("lora", "full", "none"):
        raise ValueError(f"trainable must be 'lora', 'full' or 'none', got {trainable!r}")
    s = llama_shapes(config, vocab_size)
    proj = llama_projection_shapes(s)
    p_lin = s["layers"] * sum(i * o for i, o in proj.values())
    p_head = s["d"] * s["vocab"]
    targets = set(lora_targets)
    unknown = targets - set(proj)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {sorted(proj)}")
    p_lora = s["layers"] * lora_r * sum(i + o for name, (i, o) in proj.items() if name in targets)
    p_all = p_lin + p_head + p_lora
    attn = 4 * s["layers"] * s["h"] * s["hd"] * sum_sq_lengths
    fwd = 2 * tokens * p_all + attn
    if not backward:
        return fwd
    p_trainable = {"lora": p_lora + p_head, "full": p_lin + p_head + p_lora, "none": 0}[trainable]
    return fwd + (2 * tokens * p_all + 2 * attn) + 2 * tokens * p_trainable


def resampler_forward_flops(num_queries: int, num_kv: int, embed_dim: int, kv_dim: int | None = None) -> int:
    """Qwen resampler: kv_proj, nn.MultiheadAttention (in_proj q/k/v, scores, AV, out_proj)."""
    q, n, d = num_queries, num_kv, embed_dim
    kv_proj = 2 * n * kv_dim * d if kv_dim is not None and kv_dim != d else 0
    return kv_proj + 2 * q * d * d + 4 * n * d * d + 4 * q * n * d + 2 * q * d * d


def vit_forward_flops(vit_cfg) -> int:
    """One view through the Qwen-VL ViT (`QwenViTConfig`): patch conv, blocks, attention pool, projection."""
    t = vit_cfg.grid**2
    w, m, p = vit_cfg.width, vit_cfg.mlp_width, vit_cfg.patch_size
    conv = 2 * t * 3 * p * p * w
    blocks = vit_cfg.layers * (2 * t * (4 * w * w + 2 * w * m) + 4 * t * t * w)
    pool = vit_cfg.pool
    pool_flops = resampler_forward_flops(pool.num_queries, t, pool.embed_dim, pool.kv_dim)
    proj = 2 * vit_cfg.n_queries * vit_cfg.output_dim**2
    return conv + blocks + pool_flops + proj


# ---- batches --------------------------------------------------------------------------------------------
def sequence_stats(batch: Mapping[str, Any], pad_token_id: int | None) -> tuple[Any, Any]:
    """(non-pad tokens T, Σ s_i² over samples) of an MLLM batch (src/data/mllm_collate.py contract).

    Padded batches (attention_mask set) hold one sample per row. Packed batches (attention_mask None) restart
    position_ids at every sample and at the row's pad tail; pad tokens (= pad_token_id) count for nothing.
    Tensor ops only, so no host sync on CUDA; T comes from the collator's python `num_tokens` when present.
    """
    mask = batch.get("attention_mask")  # an MLLMBatch, or its fields in a dict
    if mask is not None:
        lens = mask.sum(1)
    else:
        ids, pos = batch["input_ids"], batch["position_ids"]
        real = (ids != pad_token_id) if pad_token_id is not None else torch.ones_like(ids, dtype=torch.bool)
        seg = (pos == 0).flatten().long().cumsum(0) - 1  # every row starts a segment (position 0)
        seg = seg.clamp_min(0)
        lens = torch.zeros(seg.numel(), dtype=torch.long, device=seg.device)
        lens.scatter_add_(0, seg, real.flatten().long())
    lens = lens.to(torch.float64)
    tokens = batch.get("num_tokens")
    if tokens is None:
        tokens = lens.sum()
    return tokens, (lens * lens).sum()


def mllm_step_flops(
    batch: MLLMBatch,
    *,
    llm_config: Mapping[str, Any],
    vocab_size: int | None,
    vit_cfg,
    agent_cfg,
    pad_token_id: int | None,
    lora_r: int = 0,
    lora_targets: Iterable[str] = LLAMA_PROJECTIONS,
    trainable: str = "lora",
):
    """Model FLOPs of one SEED-X training step on `batch` (see the module docstring). A float64 tensor."""
    tokens, sum_sq = sequence_stats(batch, pad_token_id)
    llm = llama_train_flops(llm_config, tokens, sum_sq, vocab_size=vocab_size, lora_r=lora_r,
                            lora_targets=lora_targets, trainable=trainable)
    # precomputed features (data.features_dir): the ViT does not run
    n_views = 0 if batch.stored_features else batch.n_views
    vit = n_views * vit_forward_flops(vit_cfg)
    in_cfg, out_cfg = agent_cfg.input_cfg, agent_cfg.output_cfg
    r_in = resampler_forward_flops(in_cfg.num_queries, vit_cfg.n_queries, in_cfg.embed_dim, in_cfg.kv_dim)
    r_out = resampler_forward_flops(out_cfg.num_queries, out_cfg.num_queries, out_cfg.embed_dim, out_cfg.kv_dim)
    n_cmp = batch.embeds_cmp_mask.sum().to(torch.float64)
    n_gen = batch.embeds_gen_mask.sum().to(torch.float64)
    return llm + vit + 3 * r_in * n_cmp + 3 * r_out * n_gen
