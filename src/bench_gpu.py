"""`python -m src.bench_gpu --device cuda|cpu --size full|tiny --out DIR [--budget-s S]`: GPU first contact.

One prepared run (`make bench-gpu` = scripts/gpu_check.sh on the device machine) that proves every stage on
the device and measures the big shapes. Every part is guarded: a failure becomes a `failed` row with its
error and the rest still run; parts that would start after `--budget-s` are `skipped`. Writes
``DIR/bench_gpu.json`` and ``DIR/bench_gpu.md`` and prints the table last.

Parts (rows), in order:

- ``train/<stage>``: the stage's ``_tiny`` twin trains 5 steps through ``src.train`` in bf16-mixed on the
  device (de-tokenizer stages 1 and 2, MLLM pre-training, one SFT task, SEED tokenizer stage 2, SEED-LLaMA):
  every logged loss must be finite.
- ``generate/<mode>``: ``src.generate`` t2i and chat once (tiny twin, random init; bf16 on CUDA).
- ``mllm_step/<proxy>/<variant>``: the SEED-X MLLM step under strategy=fsdp2 on one rank, packed rows, at a
  1B proxy and a 13B-shaped proxy (Llama-2-13B layer width, ViT-G; as many layers as fit, halved on OOM),
  with / without activation checkpointing and torch.compile of the blocks: tokens/s, step time, peak
  memory, MFU = analytic model FLOPs (src/utils/flops.py) / step time / the device's dense bf16 peak
  (H100 SXM: 989 TFLOP/s). The frozen ViT's FLOPs are in the model FLOPs as forward only (it runs under
  no_grad; every view of the batch counted); activation recomputation is not counted (model FLOPs).
- ``detok_step/<size>``: the stage-1 de-tokenizer step (SDXL UNet + ViT-G features, frozen towers in bf16,
  UNet gradient checkpointing) at 1024 px: images/s and peak memory.
- ``decode/b<N>``: tokens/s of the KV-cached MLLM decoder (1B proxy, bf16) at batch 1 and 8.

`--size tiny` runs every part at tiny-twin sizes (the CPU dry run in tests: plumbing, not speed).
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import csv
import functools
import gc
import json
import logging
import math
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from src.bench import _fmt, _StepClock

log = logging.getLogger(__name__)

# (row, experiment) of the tiny twins trained for 5 steps
TRAIN_STAGES = (
    ("detok_stage1", "seedx_detok_pretrain_tiny"),
    ("detok_stage2", "seedx_detok_cond_tiny"),
    ("mllm_pretrain", "seedx_pretrain_tiny"),
    ("sft_edit", "seedx_sft_edit_tiny"),
    ("seed_tokenizer_stage2", "seed_tokenizer_v2_tiny"),
    ("seed_llama", "seed_llama_pretrain_tiny"),
)
GENERATE_MODES = ("t2i", "chat")
# variant -> (activation checkpointing, compile blocks)
VARIANTS = {"ckpt": (True, False), "no_ckpt": (False, False), "ckpt_compile": (True, True),
            "no_ckpt_compile": (False, True)}
# proxy -> (src.bench size at --size full, variants run there)
PROXIES = {"1b": ("1b", tuple(VARIANTS)), "13b": ("13b_proxy", ("ckpt", "no_ckpt", "ckpt_compile"))}
DECODE_BATCHES = (1, 8)
# Full-size de-tokenizer step: SDXL UNet (2.6 B) + ViT-G features at 1024 px, frozen towers in bf16.
DETOK_FULL = ["model/detokenizer=sdxl", "model/vit=qwen_vit_g", "model.detokenizer.allow_random_init=true",
              "model.detokenizer.gradient_checkpointing=true", "stage.frozen_dtype=bf16", "data.batch_size=4"]
QUIET = ["logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def expected_parts(size: str) -> list[str]:
    """Every row name a run writes (failed and skipped parts included)."""
    rows = [f"train/{name}" for name, _ in TRAIN_STAGES] + [f"generate/{m}" for m in GENERATE_MODES]
    rows += [f"mllm_step/{p}/{v}" for p, (_, variants) in PROXIES.items() for v in variants]
    rows += [f"detok_step/{'sdxl' if size == 'full' else 'tiny'}"]
    return rows + [f"decode/b{b}" for b in DECODE_BATCHES]


# ---- helpers --------------------------------------------------------------------------------------------
def _compose(config_name: str, overrides: list[str], out: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from src.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    OmegaConf.resolve(cfg)
    return cfg


def _device_overrides(device: str) -> list[str]:
    extra = ["trainer.precision=bf16-mixed"]
    return (["trainer=gpu", "trainer.devices=1", *extra] if device == "cuda" else ["trainer=cpu", *extra])


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def logged_losses(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


# ---- parts ----------------------------------------------------------------------------------------------
def train_tiny(experiment: str, device: str, out: Path, steps: int = 5) -> dict[str, Any]:
    """`steps` steps of a tiny twin through src.train.train, bf16-mixed; every logged loss finite."""
    from src.train import train

    cfg = _compose("train", [f"experiment={experiment}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
                             *QUIET, *_device_overrides(device)], out)
    train(cfg)
    losses = logged_losses(out / "csv" / "metrics.csv")
    if not losses:
        raise RuntimeError("no train/loss was logged")
    finite = all(math.isfinite(x) for x in losses)
    if not finite:
        raise FloatingPointError(f"non-finite train/loss: {losses}")
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1], "finite": finite}


def generate_once(mode: str, device: str, out: Path) -> dict[str, Any]:
    from src.generate import generate

    overrides = ["experiment=seedx_pretrain_tiny", f"mode={mode}", "prompt=a red apple on a table", "progress=false",
                 "sampling.steps=4", "generate.max_new_tokens=16", f"device={device}",
                 f"dtype={'bfloat16' if device == 'cuda' else 'float32'}"]
    if mode == "chat":
        overrides.append(f"image={Path(os.environ['PROJECT_ROOT']) / 'assets/sample/images/chelsea.jpg'}")
    reply = generate(_compose("generate", overrides, out))[0]["replies"][0]
    return {"tokens": len(reply.get("token_ids") or []) or None, "images": len(reply["images"]),
            "text_chars": len(reply["text"] or "")}


class LossClock(_StepClock):
    """bench's step clock (host time at chosen batch starts, synced on CUDA) plus every step's loss."""

    def __init__(self, indices: set[int], device: torch.device) -> None:
        super().__init__(indices, device)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))


def fit_fixed(module, cfg, batch: dict, device: torch.device, warmup: int, steps: int, strategy="auto"):
    """Lightning fit on one fixed batch repeated; (step seconds, losses)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from src.bench import _identity, step_time, timed_indices

    clock = LossClock(timed_indices(warmup, steps, device), device)
    n = warmup + steps + 1
    trainer = L.Trainer(accelerator=device.type, devices=1, strategy=strategy, precision=str(cfg.trainer.precision),
                        max_steps=n, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=cfg.trainer.get("gradient_clip_val"), num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[clock], default_root_dir=cfg.paths.output_dir)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * n, batch_size=None, collate_fn=_identity))
    if not all(math.isfinite(x) for x in clock.losses):
        raise FloatingPointError(f"non-finite loss: {clock.losses}")
    return step_time(clock.times, warmup, steps), clock.losses


def packed_batch(cfg) -> tuple[dict, Any]:
    """One packed batch of good samples of the composed MLLM config, and its datamodule."""
    import hydra

    from src.bench import good_sample_groups
    from src.data.mllm_collate import MLLMCollator

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    group = good_sample_groups(dm, 1)[0]
    collate = MLLMCollator(dm.tokenizer.pad_token_id, dm.max_length, packing=True, vit_image_size=dm.vit_image_size)
    return collate(group), dm


def mllm_step(bench_size: str, variant: str, device: str, out: Path, warmup: int, steps: int,
              layers: int | None = None) -> dict[str, Any]:
    """The MLLM step under FSDP2 on one rank (see the module docstring)."""
    import hydra

    from src.bench import _to_device
    from src.bench_config import compose_bench_cfg
    from src.utils.flops import device_peak_flops

    ckpt, compile_blocks = VARIANTS[variant]
    overrides = ["strategy=fsdp2", f"strategy.fsdp2.activation_checkpointing={str(ckpt).lower()}",
                 f"strategy.fsdp2.compile_blocks={str(compile_blocks).lower()}", "data.packing=true"]
    if device == "cpu":  # gloo + fp32: the CPU dry run checks plumbing
        overrides += ["strategy.fsdp2.param_dtype=null"]
    if layers is not None:
        overrides.append(f"model.llm.config.num_hidden_layers={layers}")
    cfg = compose_bench_cfg(out, bench_size, device, overrides)
    dev = torch.device(device)
    batch, _ = packed_batch(cfg)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    strategy = hydra.utils.instantiate(cfg.strategy)
    _reset(dev)
    step_s, losses = fit_fixed(module, cfg, batch, dev, warmup, steps, strategy)
    flops = float(module.flops_per_batch(_to_device(batch, dev)))
    peak = device_peak_flops(dev, torch.bfloat16)
    params = sum(p.numel() for p in module.parameters())
    return {"size": bench_size, "llm_layers": int(cfg.model.llm.config.num_hidden_layers),
            "llm_width": int(cfg.model.llm.config.hidden_size), "params_b": params / 1e9,
            "rows": int(batch["input_ids"].shape[0]), "width": int(batch["input_ids"].shape[1]),
            "tokens_per_step": int(batch["num_tokens"]), "step_s": step_s,
            "tokens_per_s": batch["num_tokens"] / step_s, "peak_mem_gb": _peak_gb(dev),
            "model_tflops_per_step": flops / 1e12, "mfu": flops / step_s / peak if peak else None,
            "loss_last": losses[-1]}


def detok_step(size: str, device: str, out: Path, warmup: int, steps: int) -> dict[str, Any]:
    import hydra

    from src.bench_generation import compose_detok

    cfg = compose_detok(out, [*_device_overrides(device), *(DETOK_FULL if size == "full" else [])])
    dev = torch.device(device)
    batch, samples = _detok_batch(cfg)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    # Random init straight on the GPU (a CPU init of 4.5 B parameters would take longer than the step).
    with torch.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        module.configure_model()
    module.to(dev)
    _reset(dev)
    step_s, losses = fit_fixed(module, cfg, batch, dev, warmup, steps)
    return {"resolution": int(cfg.model.detokenizer.resolution), "batch": samples, "step_s": step_s,
            "images_per_s": samples / step_s, "peak_mem_gb": _peak_gb(dev),
            "unet_params_b": sum(p.numel() for p in module.unet.parameters()) / 1e9, "loss_last": losses[-1]}


def _detok_batch(cfg) -> tuple[Any, int]:
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        n = batch.batch_size
        if n:
            return batch, int(n)
    raise RuntimeError("the de-tokenizer train loader yielded no sample")


def decode(batch: int, bench_size: str, device: str, out: Path, new_tokens: int, cache: dict) -> dict[str, Any]:
    from src.bench_config import compose_bench_cfg
    from src.bench_generation import build_generator, decode_tokens_per_s

    if "gen" not in cache:
        cfg = compose_bench_cfg(out, bench_size, device)
        cache["gen"] = build_generator(cfg, device, torch.bfloat16 if device == "cuda" else torch.float32)
    gen, builder = cache["gen"]
    dev = torch.device(device)
    _reset(dev)
    r = decode_tokens_per_s(gen, builder, batch, new_tokens)
    return {"size": bench_size, **r, "peak_mem_gb": _peak_gb(dev)}


# ---- the run --------------------------------------------------------------------------------------------
def guarded(rows: list[dict], name: str, fn: Callable[[], dict], deadline: float, device: torch.device) -> dict:
    """Run one part; its row records ok / failed (error) / skipped (time budget), and its seconds."""
    row: dict[str, Any] = {"part": name}
    if time.perf_counter() > deadline:
        row.update(status="skipped", error="time budget spent")
    else:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(fn())
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one broken part must not stop the others: it is reported
            row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:400]}", oom=_is_oom(e))
            log.error("[bench_gpu] %s failed:\n%s", name, traceback.format_exc()[-3000:])
        row["seconds"] = time.perf_counter() - t0
    rows.append(row)
    log.warning("[bench_gpu] %s: %s (%.0fs)", name, row["status"], row.get("seconds", 0.0))
    _reset(device)
    return row


def run(out: str | Path, device: str = "cuda", size: str = "full", budget_s: float = 450.0,
        warmup: int = 2, steps: int = 3, thirteen_b_layers: int = 20, parts: str = "all",
        train_steps: int = 5, work: str | Path | None = None) -> dict[str, Any]:
    if size not in ("full", "tiny"):
        raise ValueError(f"--size must be full or tiny, got {size!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available here")
    report_dir = Path(out)
    report_dir.mkdir(parents=True, exist_ok=True)
    out = Path(work) if work else report_dir / "work"  # run folders, checkpoints: kept apart from the report
    dev = torch.device(device)
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    rows: list[dict] = []
    want = lambda group: parts == "all" or group in parts.split(",")

    for name, experiment in TRAIN_STAGES:
        if want("train"):
            guarded(rows, f"train/{name}", lambda e=experiment, n=name: train_tiny(e, device, out / "train" / n, train_steps),
                    deadline, dev)
    for mode in GENERATE_MODES:
        if want("generate"):
            guarded(rows, f"generate/{mode}", lambda m=mode: generate_once(m, device, out / "generate" / m),
                    deadline, dev)
    for proxy, (full_size, variants) in PROXIES.items():
        bench_size = full_size if size == "full" else "tiny"
        layers = thirteen_b_layers if proxy == "13b" and size == "full" else None
        for variant in variants:
            if not want("mllm_step"):
                continue
            name = f"mllm_step/{proxy}/{variant}"
            while True:
                fn = functools.partial(mllm_step, bench_size, variant, device, out / name.replace("/", "_"), warmup,
                                       steps, layers)
                row = guarded(rows, name, fn, deadline, dev)
                if not (proxy == "13b" and row.get("oom") and layers and layers > 2):
                    break
                rows.pop()  # the 13B proxy did not fit: half its layers (kept for the variants after it)
                layers //= 2
                log.warning("[bench_gpu] %s: out of memory, retrying with %d layers", name, layers)
    if want("detok_step"):
        guarded(rows, f"detok_step/{'sdxl' if size == 'full' else 'tiny'}",
                lambda: detok_step(size, device, out / "detok_step", warmup, steps), deadline, dev)
    cache: dict = {}
    for b in DECODE_BATCHES:
        if want("decode"):
            guarded(rows, f"decode/b{b}", lambda b=b: decode(b, "1b" if size == "full" else "tiny", device,
                                                             out / "decode", 64 if size == "full" else 8, cache),
                    deadline, dev)
    cache.clear()
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "size": size,
              "torch": torch.__version__, "budget_s": budget_s, "wall_s": time.perf_counter() - t_start,
              "rows": rows}
    write_report(report_dir, result)
    return result


# ---- report ---------------------------------------------------------------------------------------------
SHOWN = ("loss_last", "tokens_per_s", "step_s", "mfu", "peak_mem_gb", "images_per_s", "llm_layers", "images",
         "tokens")


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| part | status | loss | tokens/s | step s | MFU | peak GB | images/s | detail | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        detail = r.get("error") or ", ".join(f"{k}={_fmt(r[k])}" for k in ("size", "llm_layers", "tokens_per_step",
                                                                           "batch", "resolution", "images")
                                             if k in r)
        cells = [r["part"], r["status"], *(_fmt(r.get(k)) for k in ("loss_last", "tokens_per_s", "step_s", "mfu",
                                                                     "peak_mem_gb", "images_per_s")),
                 detail.replace("|", "/"), _fmt(r.get("seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\ndevice={result['device']}, size={result['size']}, torch={result['torch']}, "
            f"wall {result['wall_s']:.0f}s. MFU = analytic model FLOPs (src/utils/flops.py: ViT forward only, "
            "no recomputation) / step time / dense bf16 peak.\n")


def write_report(out: Path, result: dict[str, Any]) -> None:
    from src.utils.run import atomic_write_text

    safe = json.loads(json.dumps(result, default=str), parse_constant=lambda c: None)
    atomic_write_text(out / "bench_gpu.json", json.dumps(safe, indent=2) + "\n")
    atomic_write_text(out / "bench_gpu.md", "# src.bench_gpu\n\n" + markdown_table(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m src.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--out", default="outputs/bench_gpu")
    p.add_argument("--budget-s", type=float, default=450.0, help="parts that would start later are skipped")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per step measurement")
    p.add_argument("--steps", type=int, default=3, help="timed steps per step measurement")
    p.add_argument("--layers-13b", type=int, default=20, help="Llama layers of the 13B-shaped proxy (halved on OOM)")
    p.add_argument("--work", default=None, help="run folders and checkpoints (default OUT/work)")
    p.add_argument("--train-steps", type=int, default=5, help="steps of each tiny twin's training")
    p.add_argument("--parts", default="all", help="comma list of train,generate,mllm_step,detok_step,decode")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    result = run(a.out, a.device, a.size, a.budget_s, a.warmup, a.steps, a.layers_13b, a.parts, a.train_steps,
                 a.work)
    print(f"wrote {Path(a.out) / 'bench_gpu.json'} and {Path(a.out) / 'bench_gpu.md'}")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
