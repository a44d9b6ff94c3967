"""What every bench composes: the tiny SEED-X experiment at a chosen model size (src.bench, src.bench_init,
src.bench_gpu). Its own module so that src.bench_init (which src.bench runs) never imports src.bench back."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.utils.config import CONF_DIR

EXPERIMENT = "seedx_pretrain_tiny"
DETOK_EXPERIMENT = "seedx_detok_pretrain_tiny"

# The `1b` size's ViT (~0.3B): also the de-tokenizer's at its reduced SDXL size.
VIT_1B = ["model.vit.width=1024", "model.vit.layers=24", "model.vit.heads=16", "model.vit.image_size=448",
          "model.vit.output_dim=1024", "model.vit.pool_head_dim=128"]

# Model sizes on top of the tiny experiment (random init, tiny tokenizer). `small` ~0.1B LLM, `1b` ~0.8B.
SIZES: dict[str, list[str]] = {
    "tiny": [],
    "small": [
        "model.llm.config.hidden_size=1024", "model.llm.config.intermediate_size=2816",
        "model.llm.config.num_hidden_layers=8", "model.llm.config.num_attention_heads=8",
        "model.llm.config.num_key_value_heads=8",
        "model.vit.width=512", "model.vit.layers=8", "model.vit.heads=8", "model.vit.image_size=224",
        "model.vit.output_dim=512", "model.vit.pool_head_dim=64",
        "model.agent.input_resampler.embed_dim=1024", "model.agent.input_resampler.num_heads=8",
        "model.agent.input_resampler.kv_dim=512",
        "model.agent.output_resampler.embed_dim=512", "model.agent.output_resampler.num_heads=8",
        "model.agent.output_resampler.kv_dim=1024",
        "data.max_length=2048", "data.batch_size=8",
    ],
    "1b": [
        "model.llm.config.hidden_size=2048", "model.llm.config.intermediate_size=5632",
        "model.llm.config.num_hidden_layers=16", "model.llm.config.num_attention_heads=16",
        "model.llm.config.num_key_value_heads=16",
        *VIT_1B,
        "model.agent.input_resampler.embed_dim=2048", "model.agent.input_resampler.num_heads=16",
        "model.agent.input_resampler.kv_dim=1024",
        "model.agent.output_resampler.embed_dim=1024", "model.agent.output_resampler.num_heads=16",
        "model.agent.output_resampler.kv_dim=2048",
        "data.max_length=2048", "data.batch_size=8",
    ],
    # 13B-shaped proxy for one 80 GB GPU (src/bench_gpu.py): Llama-2-13B layer width with fewer layers, the
    # full-size Qwen-VL ViT-G and SEED-X resamplers; packed rows of 2048 tokens.
    "13b_proxy": [
        "model.llm.config.hidden_size=5120", "model.llm.config.intermediate_size=13824",
        "model.llm.config.num_hidden_layers=20", "model.llm.config.num_attention_heads=40",
        "model.llm.config.num_key_value_heads=40",
        "model.vit.width=1664", "model.vit.layers=48", "model.vit.heads=16", "model.vit.image_size=448",
        "model.vit.output_dim=4096", "model.vit.pool_head_dim=128",
        "model.agent.input_resampler.embed_dim=5120", "model.agent.input_resampler.num_heads=32",
        "model.agent.input_resampler.kv_dim=4096",
        "model.agent.output_resampler.embed_dim=4096", "model.agent.output_resampler.num_heads=32",
        "model.agent.output_resampler.kv_dim=5120",
        "data.max_length=2048", "data.batch_size=4",
    ],
}


# De-tokenizer sizes on top of its tiny experiment. `sdxl_reduced`: SDXL's UNet (block widths, heads, 2048-wide
# cross-attention, text_time conditioning) with 2 instead of 10 transformer layers in its deepest blocks (0.90 B of
# 2.57 B parameters), SDXL's VAE, the full-width adapter on the `1b` ViT: 1.40 B parameters in all.
DETOK_SIZES: dict[str, list[str]] = {
    "tiny": [],
    "sdxl_reduced": ["model/detokenizer=sdxl", "model.detokenizer.allow_random_init=true",
                     "model.detokenizer.unet.transformer_layers_per_block=[1,2,2]",
                     "model.detokenizer.adapter.embedding_dim=1024", *VIT_1B],
}

# Which experiment and sizes a bench model composes.
MODELS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "mllm": (EXPERIMENT, SIZES),
    "detok": (DETOK_EXPERIMENT, DETOK_SIZES),
}


def compose_bench_cfg(out: Path, size: str = "tiny", device: str = "cpu", overrides: list[str] = (),
                      model: str = "mllm") -> DictConfig:
    experiment, sizes = MODELS[model]
    if size not in sizes:
        raise ValueError(f"--size must be one of {sorted(sizes)} for the {model} bench, got {size!r}")
    from hydra import compose, initialize_config_dir

    extra = ["trainer=gpu", "trainer.devices=1"] if device == "cuda" else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train",
                      overrides=[f"experiment={experiment}", "logger=none", *sizes[size], *extra, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    OmegaConf.resolve(cfg)
    return cfg
