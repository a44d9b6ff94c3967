"""Generation speed, shared by `make bench` (CPU ratios against the libraries) and `make bench-gpu` (tokens/s).

- ``decode_tokens_per_s``: tokens/s of our KV-cached MLLM decoder (src/pipelines/mllm.py ``MLLMGenerator``),
  greedy, a fixed number of new tokens per row (EOS never stops a row: every timing decodes the same length).
- ``generate_vs_hf``: that / tokens/s of ``transformers`` ``generate`` on the *same* Llama object (LoRA and
  all), the same left-padded text prompts, greedy, ``min_new_tokens = max_new_tokens``. Goal >= 1.0.
- ``detok_vs_diffusers``: images/s of our de-tokenizer denoising loop (src/pipelines/detok.py ``denoise``)
  / images/s of the same UNet, scheduler and adapter conditioning through diffusers'
  ``StableDiffusionXLPipeline`` (``output_type="latent"``: both sides stop before the VAE decode). Goal >= 1.0.

Each side runs once to warm up, then the two alternate for `rounds` rounds; the figures are medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

PROMPTS = ("Describe the weather today.", "What is the capital of France?", "Write a short poem about cats.",
           "Explain gravity to a child.", "List three fruits.", "How do trains work?", "Name a large animal.",
           "What colour is the sky?")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_generator(cfg: DictConfig, device: str | torch.device, dtype: torch.dtype):
    """(MLLMGenerator, sequence builder) of the MLLM stage `cfg` (a composed src.bench config), random init."""
    import hydra

    from src.pipelines.mllm import MLLMGenerator
    from src.specs.inference import build_mllm

    device = torch.device(device)
    stage_cfg = OmegaConf.to_container(cfg.stage, resolve=True)
    # Random init straight on the GPU: a 1B model's CPU init would cost more than the measurement.
    with torch.device(device) if device.type == "cuda" else _null():
        stage = build_mllm(stage_cfg)
    stage.to(device, dtype)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    gen = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
    gen.eos = -1  # never stop early: every row decodes exactly max_new_tokens free tokens
    return gen, dm.builder


def _null():
    import contextlib

    return contextlib.nullcontext()


def text_prompts(builder, n: int) -> list[dict]:
    """`n` one-turn text requests as generation prompts (the builder's own template)."""
    records = [{"id": f"bench/{i}", "source": "bench", "turns": [{"role": "user", "content": [{"text": PROMPTS[i % len(PROMPTS)]}]}]}
               for i in range(n)]
    return [builder.prompt(r, t2i=False) for r in records]


def ours(gen, samples: list[dict], new_tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) of one MLLMGenerator.generate call."""
    from src.pipelines.mllm import DecodingOptions

    _sync(gen.device)
    t0 = time.perf_counter()
    out = gen.generate(samples, DecodingOptions(max_new_tokens=new_tokens))
    _sync(gen.device)
    return time.perf_counter() - t0, sum(len(r.token_ids) for r in out)


def hf(gen, samples: list[dict], new_tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) of transformers' generate on the same Llama and left-padded prompts."""
    batch = gen._left_padded(samples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _sync(gen.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = gen.mllm.llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=gen.pad)
    _sync(gen.device)
    return time.perf_counter() - t0, int((out.shape[1] - ids.shape[1]) * out.shape[0])


def decode_tokens_per_s(gen, builder, batch: int, new_tokens: int, rounds: int = 3) -> dict[str, Any]:
    samples = text_prompts(builder, batch)
    ours(gen, samples, min(4, new_tokens))  # warm-up (allocator, kernels)
    runs = [ours(gen, samples, new_tokens) for _ in range(rounds)]
    s = statistics.median(t for t, _ in runs)
    tokens = runs[0][1]
    return {"tokens_per_s": tokens / s, "seconds": s, "tokens": tokens, "batch": batch, "new_tokens": new_tokens,
            "prompt_tokens": max(len(x["input_ids"]) for x in samples)}


def generate_vs_hf(cfg: DictConfig, batch: int = 4, new_tokens: int = 32, rounds: int = 5,
                   device: str = "cpu") -> dict[str, Any]:
    gen, builder = build_generator(cfg, device, torch.float32 if device == "cpu" else torch.bfloat16)
    samples = text_prompts(builder, batch)
    ours(gen, samples, 4)
    hf(gen, samples, 4)
    o, h = [], []
    for r in range(rounds):  # alternate which goes first: load drifts hit both alike
        pair = (ours, hf) if r % 2 == 0 else (hf, ours)
        for fn in pair:
            t, n = fn(gen, samples, new_tokens)
            (o if fn is ours else h).append(n / t)
    ours_tps, hf_tps = statistics.median(o), statistics.median(h)
    llm_cfg = cfg.model.llm.config
    return {"generate_vs_hf": ours_tps / hf_tps, "generate_ours_tokens_per_s": ours_tps,
            "generate_hf_tokens_per_s": hf_tps, "generate_batch": batch, "generate_new_tokens": new_tokens,
            "generate_llm": f"{llm_cfg.num_hidden_layers}x{llm_cfg.hidden_size}"}


# ---- de-tokenizer sampling ------------------------------------------------------------------------------
def build_decoder(cfg: DictConfig, device: str | torch.device = "cpu"):
    """The plain stage-1 ImageDecoder of a composed de-tokenizer config (random init)."""
    from src.specs.inference import build_detokenizer, image_decoder_of

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    module = build_detokenizer({"vit": model_cfg["vit"], "detokenizer": model_cfg["detokenizer"]}, "stage1")
    return image_decoder_of(module.to(device))


def sdxl_pipeline(decoder, sampler: str):
    """diffusers' SDXL pipeline over the decoder's own UNet, VAE and scheduler; no text encoders (the adapter's
    embeddings are passed as prompt embeddings, as an exported de-tokenizer is used with diffusers)."""
    import diffusers

    from src.pipelines.detok import sampler_class

    pipe = diffusers.StableDiffusionXLPipeline(
        vae=decoder.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=decoder.unet, scheduler=sampler_class(sampler).from_config(decoder.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def detok_vs_diffusers(cfg: DictConfig, images: int = 2, steps: int = 10, rounds: int = 5,
                       guidance_scale: float = 7.5) -> dict[str, Any]:
    from src.pipelines.detok import DEFAULT_SAMPLER, denoise

    decoder = build_decoder(cfg)
    res = decoder.resolution
    torch.manual_seed(0)
    feats = torch.randn(images, *decoder.negative.shape[1:])
    pipe = sdxl_pipeline(decoder, DEFAULT_SAMPLER)
    latent_shape = (decoder.unet.config.out_channels, res // decoder.vae_scale, res // decoder.vae_scale)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(images, 1)

    def run_ours() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            denoise(decoder.resampler, decoder.unet, decoder.scheduler_config, feats, time_ids, latent_shape,
                    negative=decoder.negative, steps=steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    def run_diffusers() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(**decoder.prompt_embeds(feats), num_inference_steps=steps, guidance_scale=guidance_scale,
                 height=res, width=res, output_type="latent", generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    run_ours(), run_diffusers()
    o, d = [], []
    for r in range(rounds):
        for fn in ((run_ours, run_diffusers) if r % 2 == 0 else (run_diffusers, run_ours)):
            (o if fn is run_ours else d).append(images / fn())
    ours_ips, diff_ips = statistics.median(o), statistics.median(d)
    return {"detok_vs_diffusers": ours_ips / diff_ips, "detok_ours_images_per_s": ours_ips,
            "detok_diffusers_images_per_s": diff_ips, "detok_steps": steps, "detok_images": images,
            "detok_resolution": res}


def compose_detok(out: Path, overrides: list[str] = ()) -> DictConfig:
    """experiment=seedx_detok_pretrain_tiny (+ overrides), resolved, output under `out`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from src.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=seedx_detok_pretrain_tiny", "logger=none",
                                                      *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    OmegaConf.resolve(cfg)
    return cfg
